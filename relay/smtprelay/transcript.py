"""SMTP transcripts for ``logging.debug``: every command and reply, both directions.

Lines go to the ``debug`` channel of :mod:`smtprelay.logs`, one event ``smtp`` each, with
``direction`` ``in`` (client to relay, on the front door), ``out`` (relay to client), or, on
delivery, ``send``/``recv``; ``peer`` names the other end. AUTH secrets never reach the
log: initial responses and the lines that answer a ``334`` challenge are masked. Message
content is not transcribed, only its size.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from smtprelay.logs import debug_enabled, transcript_log
from smtprelay.sendbody import send_body
from smtprelay.spool import MessageFile

MASK = "********"
_AUTH_ARGUMENT = re.compile(r"^(AUTH\s+\S+\s+)\S.*$", re.IGNORECASE | re.DOTALL)

Direction = Literal["in", "out", "send", "recv"]


def mask_auth(line: str) -> str:
    """``AUTH PLAIN dGVzdA...`` becomes ``AUTH PLAIN ********``."""
    return _AUTH_ARGUMENT.sub(rf"\g<1>{MASK}", line)


def record(direction: Direction, peer: str, line: str, **context: Any) -> None:
    transcript_log().debug("smtp", direction=direction, peer=peer, line=line, **context)


class TranscribingSMTP(aiosmtplib.SMTP):
    """aiosmtplib's client, writing each command it sends and each reply it reads.

    Hooks ``execute_command`` (every command but STARTTLS and the message), ``starttls``,
    ``data`` and the greeting read by ``_create_connection`` (aiosmtplib 5.x).
    """

    def __init__(self, *args: Any, peer: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._challenged = False
        self._peer_label = peer

    @property
    def _peer(self) -> str:
        return self._peer_label or f"{self.hostname}:{self.port}"

    def _reply(self, response: SMTPResponse) -> None:
        self._challenged = response.code == 334
        lines = response.message.splitlines() or [""]
        for number, line in enumerate(lines, 1):
            mark = " " if number == len(lines) else "-"
            record("recv", self._peer, f"{response.code}{mark}{line}".rstrip())

    async def _create_connection(self, timeout: float | None) -> SMTPResponse:
        response = await super()._create_connection(timeout)
        if debug_enabled():
            self._reply(response)
        return response

    async def execute_command(self, *args: bytes, **kwargs: Any) -> SMTPResponse:
        if not debug_enabled():
            return await super().execute_command(*args, **kwargs)
        line = b" ".join(args).decode("utf-8", "replace")
        record("send", self._peer, MASK if self._challenged else mask_auth(line))
        response = await super().execute_command(*args, **kwargs)
        self._reply(response)
        return response

    async def starttls(self, *args: Any, **kwargs: Any) -> SMTPResponse:
        if not debug_enabled():
            return await super().starttls(*args, **kwargs)
        record("send", self._peer, "STARTTLS")
        try:
            response = await super().starttls(*args, **kwargs)
        except aiosmtplib.SMTPResponseException as error:
            record("recv", self._peer, f"{error.code} {error.message}")
            raise
        self._reply(response)
        return response

    async def data(self, message: str | bytes, /, **kwargs: Any) -> SMTPResponse:
        if not debug_enabled():
            return await super().data(message, **kwargs)
        record("send", self._peer, f"DATA ({len(message)} bytes)")
        try:
            response = await super().data(message, **kwargs)
        except aiosmtplib.SMTPResponseException as error:
            record("recv", self._peer, f"{error.code} {error.message}")
            raise
        self._reply(response)
        return response

    def transcribe(self, lines: list[bytes], replies: list[SMTPResponse]) -> None:
        """A pipelined batch (:mod:`smtprelay.pipeline`): the commands, then their replies."""
        if not debug_enabled():
            return
        for line in lines:
            record("send", self._peer, mask_auth(line.decode("utf-8", "replace")))
        for reply in replies:
            self._reply(reply)

    async def send_file(
        self, message: MessageFile, *, timeout: float | None, started: bool = False
    ) -> SMTPResponse:
        """DATA with the message streamed from the spool (see :mod:`smtprelay.sendbody`);
        ``started``: DATA went out pipelined and was answered 354."""
        if not debug_enabled():
            return await send_body(self, message.pieces(), timeout=timeout, started=started)
        record(
            "send",
            self._peer,
            f"message ({message.size} bytes)" if started else f"DATA ({message.size} bytes)",
        )
        try:
            response = await send_body(self, message.pieces(), timeout=timeout, started=started)
        except aiosmtplib.SMTPResponseException as error:
            record("recv", self._peer, f"{error.code} {error.message}")
            raise
        self._reply(response)
        return response
