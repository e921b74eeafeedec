"""SMTP PIPELINING (RFC 2920) on the way out: MAIL, every RCPT and DATA in one write.

Where the next hop offers PIPELINING (Postfix does, and pipelines by default itself), a
message costs one round trip before its data instead of two plus one a recipient: over a
WAN link to a gateway that is most of a message's time; on loopback it saves two writes and
two wake-ups a message.

aiosmtplib 5 reads one reply per command and drops whatever arrives while a reply waits to
be picked up, so the later replies of a batch could be lost. `Protocol` keeps them in its
buffer while a batch is outstanding and `batch` reads them from there; outside a batch it is
aiosmtplib's protocol unchanged. It uses the same 5.x internals as :mod:`smtprelay.sendbody`
(``_buffer``, ``_response_waiter``, ``_response_pending``, ``_command_lock``), which is why
the dependency is pinned below 6.
"""

from __future__ import annotations

import functools

import aiosmtplib
import aiosmtplib.protocol
import aiosmtplib.smtp
from aiosmtplib.email import quote_address
from aiosmtplib.response import SMTPResponse


class Protocol(aiosmtplib.protocol.SMTPProtocol):
    """aiosmtplib's protocol, keeping every reply of a pipelined batch."""

    pending_batch = 0
    """Replies of the batch on the wire not read yet; 0 outside a batch."""
    overflow: aiosmtplib.SMTPResponseException | None = None

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if (
            not self.pending_batch
            or waiter is None
            or not (waiter.done() or not self._response_pending)
        ):
            super().data_received(data)
            return
        # A later reply of the batch, come before its turn: kept for `_next_reply` (aiosmtplib
        # would drop it), within aiosmtplib's own bound.
        if self.overflow is not None:
            return
        if len(self._buffer) + len(data) > aiosmtplib.protocol.MAX_RESPONSE_LENGTH:
            self.overflow = aiosmtplib.SMTPResponseException(500, "Response too long")
            del self._buffer[:]
            if self.transport is not None:
                self.transport.close()
            return
        self._buffer.extend(data)


# aiosmtplib 5 names its protocol class in its module and builds one per connection there.
aiosmtplib.smtp.SMTPProtocol = Protocol  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=1024)
def quoted(address: str) -> str:
    """``<address>`` as aiosmtplib quotes it (ValueError for one it will not send); kept, as
    the same few senders and recipients come back message after message."""
    return quote_address(address)


OUT_OF_STEP = "4.5.0 the next hop sent more replies than it was sent commands"


async def _next_reply(protocol: Protocol, timeout: float | None) -> SMTPResponse:
    """The batch's next reply: the one aiosmtplib parsed already, else the next one kept in
    the buffer, else the next to arrive."""
    waiter = protocol._response_waiter
    if waiter is not None and waiter.done():
        return await protocol.read_response(timeout=timeout)
    if protocol.overflow is not None:
        raise protocol.overflow
    buffered = protocol._read_response_from_buffer()
    if buffered is not None:
        return buffered
    return await protocol.read_response(timeout=timeout)


async def batch(
    client: aiosmtplib.SMTP, lines: list[bytes], *, timeout: float | None
) -> list[SMTPResponse]:
    """Write ``lines`` (commands without their CRLF) in one go; their replies, in order."""
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if not isinstance(protocol, Protocol):
        raise RuntimeError("the connection was not made with smtprelay.pipeline.Protocol")
    async with protocol._command_lock:
        protocol.pending_batch = len(lines)
        try:
            protocol._response_pending = True
            protocol.write(b"".join(line + b"\r\n" for line in lines))
            replies = []
            for _ in lines:
                replies.append(await _next_reply(protocol, timeout))
                protocol.pending_batch -= 1
            if protocol._buffer:
                # More replies than commands: one of them could be taken for the answer to
                # the message. Nothing more goes over this connection.
                del protocol._buffer[:]
                if protocol.transport is not None:
                    protocol.transport.close()
                raise aiosmtplib.SMTPResponseException(451, OUT_OF_STEP)
        finally:
            protocol.pending_batch = 0
    return replies
