"""What the MAIL and RCPT commands to the next hop carry, from what the message carries.

Pure but for asking the client which extensions the next hop offered: the DSN, SMTPUTF8 and
8BITMIME parameters go out only where they are offered (and a message that needs one the hop
lacks cannot go there), and the command lines for a pipelined transaction
(:mod:`smtprelay.pipeline`) are built here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiosmtplib

from smtprelay.dsn import MailOptions, RecipientOptions
from smtprelay.pipeline import quoted


@dataclass(frozen=True)
class Carried:
    """What the message carries to the next hop besides its data (see :mod:`smtprelay.dsn`)."""

    options: MailOptions = field(default_factory=MailOptions)
    recipients: Mapping[str, RecipientOptions] = field(default_factory=dict)


_PARAMETER = re.compile(r"[!-~]+")  # an esmtp-value: printable ASCII, no space (RFC 5321)


def _checked(parameter: str) -> str:
    """``parameter`` if it cannot end the command line or start another; the values come
    from the spool file, which may have been edited or damaged: ValueError otherwise."""
    if not _PARAMETER.fullmatch(parameter):
        raise ValueError(f"stored parameter {parameter[:40]!r} is not printable ASCII")
    return parameter


def mail_parameters(client: aiosmtplib.SMTP, carried: Carried) -> list[str] | str:
    """MAIL FROM parameters for this hop, or why the message cannot go to it."""
    try:
        return _mail_parameters(client, carried)
    except ValueError as error:
        return f"554 5.6.0 {error}"


def _mail_parameters(client: aiosmtplib.SMTP, carried: Carried) -> list[str] | str:
    options = carried.options
    parameters: list[str] = []
    if options.smtputf8:
        if not client.supports_extension("smtputf8"):
            return "553 5.6.7 the next hop does not offer SMTPUTF8, which this message's addresses need (RFC 6531)"
        parameters.append("SMTPUTF8")
    if options.body == "8BITMIME":
        if not client.supports_extension("8bitmime"):
            return "554 5.6.3 the next hop does not accept 8-bit data (RFC 6152) and the relay does not convert it"
        parameters.append("BODY=8BITMIME")
    if client.supports_extension("dsn"):
        if options.ret:
            parameters.append(_checked(f"RET={options.ret}"))
        if options.envid:
            parameters.append(_checked(f"ENVID={options.envid}"))
    return parameters


def rcpt_parameters(client: aiosmtplib.SMTP, options: RecipientOptions) -> list[str]:
    """RCPT TO parameters for this hop; ValueError for a damaged stored one."""
    if not client.supports_extension("dsn"):
        return []
    parameters = [f"NOTIFY={','.join(options.notify)}"] if options.notify else []
    parameters += [f"ORCPT={options.orcpt}"] if options.orcpt else []
    return [_checked(parameter) for parameter in parameters]


def command_line(verb: bytes, address: str, parameters: list[str], encoding: str) -> bytes:
    """``MAIL FROM:<address> PARAMS`` or ``RCPT TO:<address> PARAMS``, as aiosmtplib's own
    ``mail()``/``rcpt()`` write them; ValueError for an address it would not send (CR, LF,
    spaces or angle brackets outside quotes, or not in ``encoding``)."""
    return b" ".join(
        [verb + quoted(address).encode(encoding), *(p.encode("ascii") for p in parameters)]
    )
