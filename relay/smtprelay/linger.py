"""Hanging up without losing the last reply: a lingering close, as Apache and nginx do.

A client that pipelines may still be sending when the relay decides to hang up (421 after
too many errors, on shutdown, 221 to a QUIT with more behind it). Closing a socket that has
unread input makes the kernel send RST instead of FIN, and the RST can overtake the reply
still on its way: the client sees "connection reset" and never learns why. So the relay
sends its reply, half-closes (FIN after the reply), discards whatever the client still
sends, and closes when the client closes its side, when it has sent nothing for ``QUIET``
seconds, or after ``LINGER`` seconds in all. Nothing sent after the hang-up is read as a
command, and nothing is buffered.
"""

from __future__ import annotations

import asyncio
from typing import Any

QUIET = 0.5  # seconds without input after which closing cannot reset a reply in flight
LINGER = 5.0  # seconds a hung-up client may go on sending before it is cut off


class LingeringClose:
    """Mixed into aiosmtpd's SMTP class ahead of it (see receive.RelaySMTP)."""

    transport: Any
    loop: asyncio.AbstractEventLoop
    _reader: Any
    _lingering = False
    _last_input = 0.0
    _linger_until = 0.0
    _quiet_check: asyncio.TimerHandle | None = None

    def linger(self) -> None:
        """The reply is written: stop serving, and close once the client is done sending."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        self._lingering = True
        self._reader._buffer.clear()  # commands already read but not served are dropped
        now = self.loop.time()
        self._last_input, self._linger_until = now, now + LINGER
        if transport.can_write_eof():  # plain TCP: FIN after the reply; TLS cannot half-close
            transport.write_eof()
        transport.resume_reading()  # the reader may have paused it; what comes is discarded
        self._quiet_check = self.loop.call_at(now + QUIET, self._close_when_quiet)

    def _close_when_quiet(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        if now >= self._linger_until or now - self._last_input >= QUIET:
            transport.close()
            return
        self._quiet_check = self.loop.call_at(
            min(self._last_input + QUIET, self._linger_until), self._close_when_quiet
        )

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._last_input = self.loop.time()
            return
        super().data_received(data)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        if self._quiet_check is not None:
            self._quiet_check.cancel()  # the pending check would keep the session alive
            self._quiet_check = None
        super().connection_lost(error)  # type: ignore[misc]

    def eof_received(self) -> bool | None:
        if self._lingering:
            self.transport.close()  # the client is done: nothing unread, a clean close
            return False
        result: bool | None = super().eof_received()  # type: ignore[misc]
        return result
