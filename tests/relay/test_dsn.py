"""DSN (RFC 3461), SMTPUTF8 (RFC 6531) and 8BITMIME (RFC 6152): parameters accepted at the
front door, passed on to hops that offer them (Postfix's smtp-sink offers DSN and 8BITMIME,
not SMTPUTF8; an aiosmtpd sink offers SMTPUTF8), and honoured in the relay's own reports."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Dnsmasq, Relay, Sink, Zone, wait_for
from tests.relay.mail import message

Start = Callable[..., Any]


@pytest.fixture
def dns(start_dns: Start) -> Dnsmasq:
    server: Dnsmasq = start_dns(
        Zone(
            mx=[
                ("sender.test", "mx.sender.test", 10),
                ("rejects.test", "mx.rejects.test", 10),
                ("utf8.test", "mx.utf8.test", 10),
                ("ascii.test", "mx.ascii.test", 10),
            ],
            a=[
                ("mx.sender.test", "127.0.0.6"),
                ("mx.rejects.test", "127.0.0.7"),
                ("mx.utf8.test", "127.0.0.8"),
                ("mx.ascii.test", "127.0.0.9"),
            ],
        )
    )
    return server


def _transaction(
    relay: Relay,
    sender: str,
    mail_options: list[str],
    recipients: list[tuple[str, list[str]]],
    data: bytes | None = None,
    utf8: bool = False,
) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        if utf8:
            client.command_encoding = "utf-8"
        client.ehlo("client.test")
        assert client.has_extn("dsn")
        assert client.has_extn("smtputf8")
        code, reply = client.mail(sender, mail_options)
        assert code == 250, reply
        for recipient, options in recipients:
            code, reply = client.rcpt(recipient, options)
            assert code == 250, reply
        body = data or message(sender, [r for r, _ in recipients], subject="dsn test")
        code, reply = client.data(body)
        assert code == 250, reply


class TestFrontDoor:
    @pytest.mark.parametrize(
        ("command", "argument", "code"),
        [
            ("MAIL", "FROM:<a@sender.test> RET=SOME", 501),
            ("MAIL", "FROM:<a@sender.test> ENVID=bad\x7fid", 501),
            ("MAIL", "FROM:<a@sender.test> NOTIFY=NEVER", 555),
            ("RCPT", "TO:<b@x.test> NOTIFY=NEVER,FAILURE", 501),
            ("RCPT", "TO:<b@x.test> ORCPT=no-semicolon", 501),
            ("RCPT", "TO:<jörg@x.test>", 553),
        ],
    )
    def test_malformed_parameters_get_a_clear_refusal(
        self, start_relay: Start, command: str, argument: str, code: int
    ) -> None:
        """Bad DSN values and UTF-8 without SMTPUTF8 are refused; the session goes on."""
        relay: Relay = start_relay({})
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.command_encoding = "utf-8"
            client.ehlo("client.test")
            if command == "RCPT":
                assert client.mail("a@sender.test")[0] == 250
            assert client.docmd(command, argument)[0] == code
            assert client.noop()[0] == 250


class TestPassedOn:
    def test_dsn_parameters_reach_a_dsn_capable_hop_unchanged(
        self, start_relay: Start, smtp_sink: tuple[str, Path]
    ) -> None:
        """RET, ENVID (case kept), NOTIFY and ORCPT arrive at smtp-sink as sent."""
        address, dumps = smtp_sink
        relay: Relay = start_relay({"routes": [{"domains": ["x.test"], "via": [address]}]})
        _transaction(
            relay,
            "alice@sender.test",
            ["RET=HDRS", "ENVID=Q1-AbC+2Bz"],
            [("bob@x.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@X.test"])],
        )

        def dumped() -> str:
            """The dump once smtp-sink has written it all (it is created first, then filled)."""
            files = [
                p.read_text(errors="replace") for p in dumps.iterdir() if p.name.startswith("msg.")
            ]
            return files[0] if len(files) == 1 and "X-Rcpt-Args" in files[0] else ""

        text = wait_for(dumped, what="smtp-sink's dump of the transaction")
        assert "X-Mail-Args: <alice@sender.test> RET=HDRS ENVID=Q1-AbC+2Bz" in text
        assert "X-Rcpt-Args: <bob@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@X.test" in text
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        assert relay.events("relay_notice") == []  # the DSN-capable hop reports from here

    def test_a_utf8_address_goes_to_a_smtputf8_hop_and_is_returned_by_one_without(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """jörg@utf8.test is relayed with SMTPUTF8; jörg@ascii.test (no SMTPUTF8 there)
        comes back to the sender with 5.6.7 and a reason naming SMTPUTF8."""
        utf8: Sink = start_sink("127.0.0.8", smtp_port, enable_SMTPUTF8=True)
        ascii_only: Sink = start_sink("127.0.0.9", smtp_port, enable_SMTPUTF8=False)
        sender_mx: Sink = start_sink("127.0.0.6", smtp_port)
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1h"}}
        )
        _transaction(
            relay,
            "alice@sender.test",
            ["SMTPUTF8"],
            [("jörg@utf8.test", []), ("jörg@ascii.test", [])],
            utf8=True,
        )
        [got] = utf8.wait_for_messages()
        assert got.recipients == ("jörg@utf8.test",)
        [report] = sender_mx.wait_for_messages()
        status = list(report.message.iter_parts())[1].as_string()
        assert "Status: 5.6.7" in status
        assert "SMTPUTF8" in status
        assert ascii_only.messages == []

    def test_8bitmime_goes_to_a_hop_offering_it_and_is_returned_by_one_without(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """BODY=8BITMIME: delivered where 8BITMIME is offered; a 7-bit-only hop (aiosmtpd
        decoding data offers none) is not sent 8-bit data: the sender gets 5.6.3."""
        eight: Sink = start_sink("127.0.0.8", smtp_port)
        seven: Sink = start_sink("127.0.0.9", smtp_port, decode_data=True)
        sender_mx: Sink = start_sink("127.0.0.6", smtp_port)
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1h"}}
        )
        body = message("alice@sender.test", ["a@utf8.test"], body="Grüße\n")
        _transaction(
            relay,
            "alice@sender.test",
            ["BODY=8BITMIME"],
            [("a@utf8.test", []), ("b@ascii.test", [])],
            data=body,
        )
        [got] = eight.wait_for_messages()
        assert got.recipients == ("a@utf8.test",)
        [report] = sender_mx.wait_for_messages()
        assert "Status: 5.6.3" in list(report.message.iter_parts())[1].as_string()
        assert seven.messages == []


class TestOwnReports:
    def _relay(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, port: int
    ) -> tuple[Relay, Sink]:
        start_sink("127.0.0.7", port, rcpt_reply="550 5.1.1 no such user")
        sender_mx: Sink = start_sink("127.0.0.6", port)
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": port, "queueTimer": "1h"}}
        )
        return relay, sender_mx

    def test_notify_never_means_no_report(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A failed recipient with NOTIFY=NEVER: the message leaves, no report is made."""
        relay, sender_mx = self._relay(dns, start_sink, start_relay, smtp_port)
        _transaction(relay, "alice@sender.test", [], [("ghost@rejects.test", ["NOTIFY=NEVER"])])
        [suppressed] = wait_for(lambda: relay.events("bounce_suppressed"))
        assert suppressed["reason"] == "NOTIFY without FAILURE"
        wait_for(lambda: relay.queued() == [], what="the failed message to leave")
        assert relay.events("bounced") == []
        assert sender_mx.messages == []

    def test_notify_success_through_a_hop_without_dsn_gets_a_relayed_notice(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """The aiosmtpd MX offers no DSN: the relay itself says Action: relayed, once."""
        start_sink("127.0.0.8", smtp_port)
        relay, sender_mx = self._relay(dns, start_sink, start_relay, smtp_port)
        _transaction(relay, "alice@sender.test", [], [("bob@utf8.test", ["NOTIFY=SUCCESS"])])
        [got] = sender_mx.wait_for_messages()
        assert got.message["Subject"] == "Successful Mail Relay Report"
        status = list(got.message.iter_parts())[1].as_string()
        assert "Action: relayed" in status
        assert "Final-Recipient: rfc822; bob@utf8.test" in status

    @pytest.mark.parametrize("ret", ["HDRS", "FULL"])
    def test_ret_envid_and_orcpt_shape_the_report(
        self, ret: str, dns: Dnsmasq, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """RET=HDRS: headers only; RET=FULL: the whole message; ENVID and ORCPT echoed."""
        relay, sender_mx = self._relay(dns, start_sink, start_relay, smtp_port)
        body = message("alice@sender.test", ["ghost@rejects.test"], body="secret body text\n")
        _transaction(
            relay,
            "alice@sender.test",
            [f"RET={ret}", "ENVID=env-42"],
            [("ghost@rejects.test", ["ORCPT=rfc822;Ghost@rejects.test"])],
            data=body,
        )
        [got] = sender_mx.wait_for_messages()
        parts = list(got.message.iter_parts())
        status = parts[1].as_string()
        assert "Original-Envelope-Id: env-42" in status
        assert "Original-Recipient: rfc822; Ghost@rejects.test" in status
        returned = got.data.decode(errors="replace")
        if ret == "HDRS":
            assert parts[2].get_content_type() == "text/rfc822-headers"
            assert "secret body text" not in returned
        else:
            assert parts[2].get_content_type() == "message/rfc822"
            assert "secret body text" in returned
