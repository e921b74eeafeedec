"""`smtprelay.pipeline.Protocol` keeps the replies of a pipelined batch whatever order the
event loop hands them over in. The end-to-end tests (test_pipelining.py) cannot choose when
the kernel splits or joins the hop's replies, so here the bytes are fed to a protocol on a
real socket in the orders that lose a reply with aiosmtplib's own protocol."""

from __future__ import annotations

import asyncio
import socket

import aiosmtplib
import aiosmtplib.protocol
import pytest
from smtprelay import pipeline


async def _connected() -> tuple[pipeline.Protocol, socket.socket]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    protocol = pipeline.Protocol(loop=loop)
    await loop.connect_accepted_socket(lambda: protocol, ours)
    return protocol, theirs


def test_a_reply_that_comes_before_its_turn_is_kept() -> None:
    """The RCPT reply arrives after the MAIL reply was parsed but before it was picked up
    (aiosmtplib drops such data): both are read, in order."""

    async def run() -> list[str]:
        protocol, peer = await _connected()
        protocol.pending_batch = 2
        protocol._response_pending = True
        protocol.data_received(b"250 2.1.0 sender ok\r\n")
        protocol.data_received(b"550 5.1.1 no such user\r\n")  # the waiter is done already
        first = await pipeline._next_reply(protocol, 1)
        second = await pipeline._next_reply(protocol, 1)
        peer.close()
        return [first.message, second.message]

    assert asyncio.run(run()) == ["2.1.0 sender ok", "5.1.1 no such user"]


def test_replies_that_come_together_are_read_one_by_one() -> None:
    """MAIL, RCPT and DATA replies in one segment: three replies, none waited for in vain."""

    async def run() -> list[int]:
        protocol, peer = await _connected()
        protocol.pending_batch = 3
        protocol._response_pending = True
        protocol.data_received(b"250 ok\r\n250-first\r\n250 last\r\n354 go ahead\r\n")
        codes = [(await pipeline._next_reply(protocol, 1)).code for _ in range(3)]
        peer.close()
        return codes

    assert asyncio.run(run()) == [250, 250, 354]


def test_a_flood_while_a_reply_waits_is_refused_not_kept() -> None:
    """A hop that sends more than a reply may hold while one waits to be picked up: the
    connection is closed and the next read says so; the buffer does not grow."""

    async def run() -> tuple[int, int]:
        protocol, peer = await _connected()
        protocol.pending_batch = 2
        protocol._response_pending = True
        protocol.data_received(b"250 ok\r\n")
        for _ in range(100):
            protocol.data_received(b"250-" + b"x" * 900 + b"\r\n")
        held = len(protocol._buffer)
        first = await pipeline._next_reply(protocol, 1)  # parsed before the flood
        assert first.code == 250
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await pipeline._next_reply(protocol, 1)
        peer.close()
        return held, refused.value.code

    held, code = asyncio.run(run())
    assert held <= aiosmtplib.protocol.MAX_RESPONSE_LENGTH
    assert code == 500


def test_more_replies_than_commands_end_the_connection() -> None:
    """A hop that answers a batch of two with three replies is out of step (its extra reply
    could be taken for the answer to the message): refused, and the connection closed."""

    async def run() -> tuple[int, bool]:
        protocol, peer = await _connected()
        client = aiosmtplib.SMTP()
        client.protocol = protocol
        loop = asyncio.get_running_loop()
        # the three replies come in at once, right after the batch is written
        loop.call_soon(protocol.data_received, b"250 ok\r\n250 ok\r\n250 spare\r\n")
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await pipeline.batch(
                client, [b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>"], timeout=1
            )
        closing = protocol.transport is None or protocol.transport.is_closing()
        peer.close()
        return refused.value.code, closing

    assert asyncio.run(run()) == (451, True)
