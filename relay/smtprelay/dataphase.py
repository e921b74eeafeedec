"""The DATA command, streamed: what the client sends after 354 goes to the spool's file as
it arrives, decoded by :mod:`smtprelay.bodystream`, never gathered into memory.

aiosmtpd's own ``smtp_DATA`` keeps every line of a message as a separate object, then joins
and copies them (hundreds of MiB for a message of short lines); this replaces it, keeping
its checks and replies. The handler's ``begin_message`` opens a spool draft (envelope and
``Received:`` header first) and ``end_message`` gives the reply once the draft is durable.
The whole DATA phase has ``data_timeout`` seconds, however slowly the client sends.
"""

from __future__ import annotations

from typing import Any

from smtprelay.bodystream import BodyDecoder
from smtprelay.logs import system_log

READ_SIZE = 65536


class StreamingData:
    """Mixed into aiosmtpd's SMTP class ahead of it (see receive.RelaySMTP)."""

    _data_timeout: float
    _reader: Any
    event_handler: Any
    envelope: Any
    session: Any
    transport: Any
    data_size_limit: int | None

    async def smtp_DATA(self, arg: str | None) -> None:
        smtp: Any = self  # aiosmtpd's methods, untyped
        if await smtp.check_helo_needed():
            return
        if await smtp.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await smtp.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await smtp.push("501 5.5.4 Syntax: DATA")
            return
        smtp._reset_timeout(self._data_timeout)
        # The 354 goes first: the client starts sending while the draft is made.
        await smtp.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            draft = self.event_handler.begin_message(self.session, self.envelope)
        except Exception:
            # What the client sends now is message text: it must never be read as
            # commands, so the session ends here (421 may come at any time, RFC 5321).
            system_log().exception("data_failed", peer=str(self.session.peer))
            await smtp.push("421 4.3.0 Local error in processing, closing connection")
            self.transport.close()
            return
        try:
            body = BodyDecoder(size_limit=self.data_size_limit or None)
            while not body.done:
                piece = await self._reader.read(READ_SIZE)
                if not piece:  # EOF: aiosmtpd cancels us, but be sure
                    raise ConnectionResetError("connection closed during DATA")
                data, rest = body.feed(piece)
                await draft.write(data)
                if rest:  # pipelined commands after the end of data: read them next
                    self._reader._buffer[0:0] = rest
        except BaseException:
            draft.discard()
            raise
        status = await self.event_handler.end_message(self.session, draft, body)
        smtp._set_post_data_state()
        await smtp.push(status)
        if self.transport is not None:
            smtp._reset_timeout()
