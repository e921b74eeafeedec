"""The DATA phase in process: what the client sends after 354 is never read as commands."""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import Envelope, Session
from smtprelay.receive import RelaySMTP


class _FailingDraft:
    """A handler whose draft cannot be made: the one fault this test needs, which the real
    handler (pure, in memory) cannot be made to produce."""

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def begin_message(self, session: Session, envelope: Envelope) -> Any:
        raise RuntimeError("no draft")


async def _dialogue() -> list[bytes]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RelaySMTP(_FailingDraft(), hostname="relay.test"), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await reader.readline()]
    for command in (b"EHLO c.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>", b"DATA"):
        writer.write(command + b"\r\n")
        while (line := await reader.readline())[3:4] == b"-":
            pass
        replies.append(line)
    # Message text that looks like commands: a smuggled second transaction.
    writer.write(b"RSET\r\nMAIL FROM:<ceo@bank.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\n")
    rest = await asyncio.wait_for(reader.read(), timeout=10)  # until the server closes
    replies.extend(rest.splitlines(keepends=True))
    writer.close()
    server.close()
    await server.wait_closed()
    return replies


def test_a_draft_that_cannot_be_made_ends_the_session_and_reads_no_commands() -> None:
    replies = asyncio.run(_dialogue())
    assert replies[4].startswith(b"354")
    assert replies[5:] == [b"421 4.3.0 Local error in processing, closing connection\r\n"]
