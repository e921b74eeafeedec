"""The MAIL and RCPT parameters the relay sends come from the spool file, which may have been
edited or damaged: one that could end the command line (and start another) is refused."""

from __future__ import annotations

import aiosmtplib
import pytest
from smtprelay.commands import Carried, mail_parameters, rcpt_parameters
from smtprelay.dsn import MailOptions, RecipientOptions


def _dsn_hop() -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP()
    client.esmtp_extensions = {"dsn": ""}  # as if its EHLO had offered DSN
    return client


def test_stored_parameters_go_out_as_kept() -> None:
    carried = Carried(options=MailOptions(ret="HDRS", envid="QQ+2B1"))
    assert mail_parameters(_dsn_hop(), carried) == ["RET=HDRS", "ENVID=QQ+2B1"]
    options = RecipientOptions(notify=("FAILURE", "DELAY"), orcpt="rfc822;b@example.test")
    assert rcpt_parameters(_dsn_hop(), options) == [
        "NOTIFY=FAILURE,DELAY",
        "ORCPT=rfc822;b@example.test",
    ]


@pytest.mark.parametrize("envid", ["x\r\nRCPT TO:<evil@example.test>", "a b", "caf\u00e9", "x\x00"])
def test_a_damaged_envid_fails_the_message_instead_of_reaching_the_wire(envid: str) -> None:
    refusal = mail_parameters(_dsn_hop(), Carried(options=MailOptions(envid=envid)))
    assert isinstance(refusal, str)
    assert refusal.startswith("554 5.6.0 ")


def test_a_damaged_orcpt_is_refused() -> None:
    with pytest.raises(ValueError, match="not printable ASCII"):
        rcpt_parameters(_dsn_hop(), RecipientOptions(orcpt="rfc822;a@b\r\nDATA"))
    with pytest.raises(ValueError, match="not printable ASCII"):
        rcpt_parameters(_dsn_hop(), RecipientOptions(notify=("FAILURE\nQUIT",)))
