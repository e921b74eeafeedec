"""SMTP smuggling variants stay one message; the open-relay tricks get nothing through."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.peers import Relay, Sink, Zone, wait_for
from tests.reliability.wire import Wire

Start = Callable[..., Any]
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
SMUGGLED = (
    b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsend money\r\n.\r\n"
)


@pytest.mark.parametrize(
    "end",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"],
    ids=["LF.LF", "CR.CR", "CRLF.LF", "LF.CRLF", "CR.CRLF", "CRLF.CR", "LF.CR"],
)
def test_a_smuggling_variant_stays_inside_one_message(
    start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int, end: bytes
) -> None:
    """A non-standard end of data followed by a second transaction is one message to the
    first recipient only, and only CRLF line endings leave the relay."""
    dns = start_dns(
        Zone(mx=[("example.test", "mx.example.test", 10)], a=[("mx.example.test", "127.0.0.2")])
    )
    mx: Sink = start_sink("127.0.0.2", smtp_port)
    relay: Relay = start_relay({"dnsServers": [dns.server], "delivery": {"port": smtp_port}})
    with Wire(relay.port) as wire:
        wire.command(b"EHLO client.test")
        wire.command(b"MAIL FROM:<alice@sender.test>")
        wire.command(b"RCPT TO:<bob@example.test>")
        assert wire.command(b"DATA").startswith(b"354")
        wire.send(b"Subject: hello\r\n\r\nhi" + end + SMUGGLED)
        assert wire.reply().startswith(b"250 2.0.0")
        assert wire.command(b"QUIT").startswith(b"221")
    [got] = mx.wait_for_messages()
    assert got.recipients == ("bob@example.test",)
    assert b"send money" in got.data  # inside the one message, as text
    assert BARE.search(got.data) is None
    wait_for(lambda: relay.queued() == [], what="the spool to empty")
    assert len(mx.messages) == 1
    [accepted] = relay.events("accepted")
    assert accepted["bare_newlines"] >= 1


@pytest.mark.parametrize(
    "recipient",
    [
        b"<bob@example.test>",
        b"<bob%example.test@relay.test>",
        b"<bob%example.test@[127.0.0.1]>",
        b"<@relay.test:bob@example.test>",
        b"<@relay.test,@hop.test:bob@example.test>",
        b'<"bob@example.test"@relay.test>',
        b"<bob!example.test@relay.test>",
        b"<example.test!bob>",
        b"<bob@example.test@relay.test>",
        b"<bob>",
        b"<postmaster>",
        b"<postmaster@relay.test>",
        b"<bob@[127.0.0.1]>",
        b"<bob@[IPv6:::1]>",
        b"<bob@relay.test.>",
    ],
)
def test_no_open_relay_trick_gets_through_from_outside(
    start_relay: Start, recipient: bytes
) -> None:
    """From outside allowedNetworks, every way of naming a remote (or local) mailbox is
    refused at RCPT with a 5xx, DATA finds no recipient, and nothing is queued."""
    relay: Relay = start_relay(
        {"allowedNetworks": ["127.0.0.1/32"], "defaultMailHost": "mailhost.test"}
    )
    with Wire(relay.port, source="127.0.0.66") as wire:
        wire.command(b"EHLO outside.test")
        assert wire.command(b"MAIL FROM:<x@outside.test>").startswith(b"250")
        reply = wire.command(b"RCPT TO:" + recipient)
        assert reply[:1] == b"5", reply
        assert wire.command(b"DATA").startswith(b"503")
    assert relay.queued() == []
