"""DATA to the next hop, streamed from the spool file in pieces.

aiosmtplib's ``data()`` takes the whole message as one bytes object (and copies it twice
while it dot-stuffs); this sends the DATA command through its protocol object and writes the
message a piece at a time, dot-stuffed on the way (RFC 5321 §4.5.2), waiting for the socket
to drain between pieces. Memory per delivery: one piece (64 KiB), its stuffed copy, and the
transport's write buffer (its high-water mark, 64 KiB). It uses aiosmtplib's protocol
internals (``_command_lock``, ``_response_pending``, ``_drain_helper``; 5.x), so the
dependency is pinned below 6.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiosmtplib
from aiosmtplib.response import SMTPResponse


class RefusedAfterDot(aiosmtplib.SMTPDataError):
    """The server refused the message in its reply to the final dot: the transaction is
    over and the session is back in its initial state, unlike a refused DATA command."""


def stuffed(pieces: Iterable[bytes]) -> Iterable[bytes]:
    """The message dot-stuffed, ending in CRLF, ready for ``.<CRLF>``."""
    line_start = True
    last = b"\n"
    for piece in pieces:
        if not piece:
            continue
        out = piece.replace(b"\n.", b"\n..")
        if line_start and out[:1] == b".":
            out = b"." + out
        line_start = out.endswith(b"\n")
        last = out[-1:]
        yield out
    if last != b"\n":
        yield b"\r\n"


async def send_body(
    client: aiosmtplib.SMTP,
    pieces: Iterable[bytes],
    *,
    timeout: float | None,
    started: bool = False,
) -> SMTPResponse:
    """DATA, the message, ``.``; returns the final reply or raises `SMTPDataError`.
    ``started``: DATA was sent already and answered 354 (pipelined, :mod:`smtprelay.pipeline`)."""
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    async with protocol._command_lock:
        if not started:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
        protocol._response_pending = True  # a reply sent early (552 ...) must not be lost
        previous = b""
        for piece in stuffed(pieces):
            if previous:
                protocol.write(previous)
                await protocol._drain_helper()
            previous = piece
        protocol.write(previous + b".\r\n")  # the last piece and the dot: one send
        reply = await protocol.read_response(timeout=timeout)
    if reply.code != 250:
        raise RefusedAfterDot(reply.code, reply.message)
    return reply
