"""Returning undeliverable mail: RFC 3464 reports to the sender, never for a null sender."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from tests.peers import Received, Relay, Sink, Zone, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(
        mx=[
            ("rejects.test", "mx.rejects.test", 10),
            ("busy.test", "mx.busy.test", 10),
            ("sender.test", "mx.sender.test", 10),
        ],
        a=[
            ("mx.rejects.test", "127.0.0.7"),
            ("mx.busy.test", "127.0.0.8"),
            ("mx.sender.test", "127.0.0.6"),
        ],
        null_mx=["nullmx.test"],
    )


def _setup(
    start_dns: Start, start_sink: Start, start_relay: Start, port: int, **delivery: Any
) -> tuple[Relay, Sink]:
    dns = start_dns(_zone())
    start_sink("127.0.0.7", port, rcpt_reply="550 5.1.1 no such user here")
    start_sink("127.0.0.8", port, rcpt_reply="451 4.7.1 greylisted, try later")
    sender_mx: Sink = start_sink("127.0.0.6", port)
    relay: Relay = start_relay({"dnsServers": [dns.server], "delivery": {"port": port, **delivery}})
    return relay, sender_mx


def _report(got: Received) -> tuple[EmailMessage, list[Any]]:
    message = got.message
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    return message, parts


class TestBounce:
    def test_a_5xx_reply_returns_the_message_at_once(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """550 at RCPT fails the recipient on attempt 1 and the sender gets a report."""
        relay, sender_mx = _setup(start_dns, start_sink, start_relay, smtp_port, queueTimer="1h")
        send(relay.port, "alice@sender.test", ["ghost@rejects.test"], subject="to a ghost")
        [got] = sender_mx.wait_for_messages()
        assert got.sender == ""  # reports go out with a null envelope sender
        assert got.recipients == ("alice@sender.test",)
        message, parts = _report(got)
        assert message["From"].startswith("Mail Delivery System <MAILER-DAEMON@relay.test>")
        status = parts[1].as_string()
        assert "Final-Recipient: rfc822; ghost@rejects.test" in status
        assert "Status: 5.1.1" in status
        assert "550 5.1.1 no such user here" in status
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert "Subject: to a ghost" in parts[2].get_payload()
        wait_for(lambda: relay.queued() == [], what="the failed message to leave the spool")

    def test_nxdomain_returns_the_message_at_once(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A domain that does not exist fails on attempt 1, not after `tries`."""
        relay, sender_mx = _setup(start_dns, start_sink, start_relay, smtp_port, queueTimer="1h")
        send(relay.port, "alice@sender.test", ["x@nowhere.test"])
        [got] = sender_mx.wait_for_messages()
        _, parts = _report(got)
        assert "Status: 5.1.2" in parts[1].as_string()
        assert "NXDOMAIN" in parts[1].as_string()

    def test_null_mx_returns_the_message_at_once(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A domain publishing a null MX (RFC 7505) accepts no mail: fail on attempt 1."""
        relay, sender_mx = _setup(start_dns, start_sink, start_relay, smtp_port, queueTimer="1h")
        send(relay.port, "alice@sender.test", ["x@nullmx.test"])
        [got] = sender_mx.wait_for_messages()
        _, parts = _report(got)
        assert "Status: 5.1.10" in parts[1].as_string()

    def test_returned_after_tries_attempts(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A recipient that only ever defers fails after `tries` attempts, then bounces."""
        relay, sender_mx = _setup(
            start_dns, start_sink, start_relay, smtp_port, queueTimer="1s", tries=3
        )
        send(relay.port, "alice@sender.test", ["slow@busy.test"])
        [got] = sender_mx.wait_for_messages(timeout=30)
        _, parts = _report(got)
        assert "451 4.7.1 greylisted" in parts[1].as_string()
        attempts = [
            (e["attempt"], e["outcome"])
            for e in relay.events("delivery")
            if e["recipient"] == "slow@busy.test"
        ]
        assert attempts == [(1, "deferred"), (2, "deferred"), (3, "failed")]

    def test_only_the_failed_recipient_is_reported(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Of two recipients, the delivered one is not in the report."""
        relay, sender_mx = _setup(start_dns, start_sink, start_relay, smtp_port, queueTimer="1h")
        send(relay.port, "alice@sender.test", ["ghost@rejects.test", "bob@sender.test"])
        messages = sender_mx.wait_for_messages(2)
        reports = [m for m in messages if m.sender == ""]
        [report] = reports
        status = _report(report)[1][1].as_string()
        assert "ghost@rejects.test" in status
        assert "bob@sender.test" not in status

    def test_no_report_for_a_null_sender(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A message from <> that fails is dropped with a log line, never bounced."""
        relay, sender_mx = _setup(start_dns, start_sink, start_relay, smtp_port, queueTimer="1h")
        send(relay.port, "", ["ghost@rejects.test"])
        wait_for(lambda: relay.events("bounce_suppressed"), what="the suppressed bounce")
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        assert sender_mx.messages == []
        assert relay.events("bounced") == []


class TestDelayWarning:
    def test_the_sender_is_told_once_that_mail_is_delayed(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """delayWarning 1s, a greylisting MX, attempts every second: one Action: delayed
        report arrives after the first second, and no second one on later attempts."""
        relay, sender_mx = _setup(
            start_dns, start_sink, start_relay, smtp_port, queueTimer="1s", delayWarning="1s"
        )
        send(relay.port, "alice@sender.test", ["bob@busy.test"], subject="slow one")
        [got] = sender_mx.wait_for_messages()
        message, parts = _report(got)
        assert message["Subject"] == "Delayed Mail (still being retried)"
        status = parts[1].as_string()
        assert "Action: delayed" in status
        assert "Status: 4.7.1" in status
        wait_for(lambda: len(relay.events("delivery")) >= 4, what="two attempts after the notice")
        assert len(sender_mx.messages) == 1
        [notice] = relay.events("delay_notice")
        assert notice["recipients"] == ["bob@busy.test"]
        assert len(relay.queued()) == 1  # still queued: a notice, not a bounce

    def test_off_by_default(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Without delayWarning a deferred message brings the sender nothing."""
        relay, sender_mx = _setup(start_dns, start_sink, start_relay, smtp_port, queueTimer="1s")
        send(relay.port, "alice@sender.test", ["bob@busy.test"])
        wait_for(lambda: len(relay.events("delivery")) >= 3, what="three attempts")
        assert sender_mx.messages == []
