"""Each defect of issue 12 found with a plain socket client, as its own regression test."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from smtprelay.logs import StreamSink

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import message, send
from tests.reliability.wire import Wire

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(
        mx=[
            ("example.test", "mx.example.test", 10),
            ("sender.test", "mx.sender.test", 10),
            ("rejects.test", "mx.rejects.test", 10),
        ],
        a=[
            ("mx.example.test", "127.0.0.2"),
            ("mx.sender.test", "127.0.0.6"),
            ("mx.rejects.test", "127.0.0.7"),
        ],
    )


class TestEnvelope:
    @pytest.mark.parametrize(
        "address",
        [
            b"a\x01b@example.test",
            b"bob@" + b"a" * 64 + b".test",
            b"bob@" + b".".join([b"a" * 60] * 5) + b".test",
            b"x" * 65 + b"@example.test",
            b"bob@example.test.",
        ],
        ids=["control-char", "label-64", "domain-over-255", "local-part-65", "trailing-dot"],
    )
    def test_a_bad_recipient_is_refused_at_rcpt_and_the_good_one_arrives_once(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        address: bytes,
    ) -> None:
        """RFC 5321 syntax and lengths are checked at RCPT with a 5xx naming the problem;
        the good recipient of the same transaction is delivered exactly once."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1s"}}
        )
        with Wire(relay.port) as wire:
            assert wire.command(b"EHLO client.test").startswith(b"250")
            assert wire.command(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
            assert wire.command(b"RCPT TO:<good@example.test>").startswith(b"250")
            refused = wire.command(b"RCPT TO:<" + address + b">")
            assert refused.startswith(b"553 5.1.3"), refused
            assert wire.command(b"DATA").startswith(b"354")
            assert wire.command(b"Subject: once\r\n\r\nbody\r\n.").startswith(b"250")
        [got] = mx.wait_for_messages()
        assert got.recipients == ("good@example.test",)
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        assert len(mx.messages) == 1
        assert not relay.events("attempt_crashed")

    def test_a_bad_sender_is_refused_at_mail(self, start_relay: Start) -> None:
        """MAIL FROM with a control character gets 553 5.1.7 naming it; the session goes on."""
        relay: Relay = start_relay({})
        with Wire(relay.port) as wire:
            wire.command(b"EHLO client.test")
            reply = wire.command(b"MAIL FROM:<al\x7fice@sender.test>")
            assert reply.startswith(b"553 5.1.7")
            assert b"control character" in reply
            assert wire.command(b"MAIL FROM:<alice@sender.test>").startswith(b"250")

    def test_duplicate_recipients_get_one_copy(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """RCPT TO the same address twice (domain case aside) delivers one copy."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay: Relay = start_relay({"dnsServers": [dns.server], "delivery": {"port": smtp_port}})
        send(relay.port, "alice@sender.test", ["bob@example.test", "bob@EXAMPLE.test"])
        [got] = mx.wait_for_messages()
        assert got.recipients == ("bob@example.test",)
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        assert len(mx.messages) == 1


class TestHeaders:
    def test_an_ehlo_name_cannot_inject_a_header(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """EHLO client.test<CR>X-Injected: forged gets 501 and the relayed message carries no
        header of the client's choosing."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay: Relay = start_relay({"dnsServers": [dns.server], "delivery": {"port": smtp_port}})
        with Wire(relay.port) as wire:
            reply = wire.command(b"EHLO client.test\rX-Injected: forged")
            assert reply.startswith(b"501 5.5.4"), reply
            assert wire.command(b"MAIL FROM:<alice@sender.test>").startswith(b"503")
            assert wire.command(b"HELO client.test").startswith(b"250")
            wire.command(b"MAIL FROM:<alice@sender.test>")
            wire.command(b"RCPT TO:<bob@example.test>")
            wire.command(b"DATA")
            assert wire.command(message("alice@sender.test", ["bob"]) + b".").startswith(b"250")
        [got] = mx.wait_for_messages()
        assert "X-Injected" not in got.message
        assert got.message["Received"].startswith("from client.test ")

    def test_a_remote_multiline_refusal_cannot_add_fields_to_a_report(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """550-...<CRLF>550 Action: delivered is quoted on one Diagnostic-Code line; the report
        has exactly one Action field, 'failed'."""
        dns = start_dns(_zone())
        start_sink(
            "127.0.0.7",
            smtp_port,
            rcpt_reply="550-5.1.1 no such user\r\n550 Action: delivered",
        )
        sender_mx: Sink = start_sink("127.0.0.6", smtp_port)
        relay: Relay = start_relay({"dnsServers": [dns.server], "delivery": {"port": smtp_port}})
        send(relay.port, "alice@sender.test", ["ghost@rejects.test"])
        [got] = sender_mx.wait_for_messages()
        status = list(got.message.iter_parts())[1].as_string()
        assert [line for line in status.splitlines() if line.startswith("Action:")] == [
            "Action: failed"
        ]
        assert "Diagnostic-Code: smtp; 550 5.1.1 no such user Action: delivered" in status


class TestLogs:
    def test_log_lines_quote_what_the_client_sent(self, start_relay: Start) -> None:
        """A refused EHLO name with CR/LF and NUL stays inside one JSON log line."""
        relay: Relay = start_relay({})
        with Wire(relay.port) as wire:
            wire.command(b'EHLO evil\r\x00{"event":"accepted"}')
        wait_for(lambda: relay.events("refused"), what="the refusal to be logged")
        for line in relay.log_text().splitlines():
            if line.startswith("{"):
                assert json.loads(line)["event"] != "accepted"

    def test_a_terminal_sees_control_characters_escaped(self) -> None:
        """The human-friendly rendering on a TTY (structlog's, repr of values) escapes CR, LF
        and ESC from clients, as the JSON lines do."""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        screen = Terminal()
        StreamSink(screen).write({"event": "refused", "helo": "evil\r\nX-Forged: 1\x1b[2J"})
        assert screen.getvalue().count("\n") == 1
        assert "\x1b" not in screen.getvalue()
        assert "X-Forged" in screen.getvalue()  # shown, as one escaped value
