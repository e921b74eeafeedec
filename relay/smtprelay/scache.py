"""The delivery connection cache, as Postfix's ``scache``: sessions kept open between messages.

A session that has just finished a transaction is kept for a short while (``IDLE_LIMIT``);
the next message for the same host, TLS level and credentials takes it and goes on with MAIL
FROM, instead of paying for a new connection, greeting, EHLO, STARTTLS, AUTH and QUIT. A
transaction that ended with the reply to its message's final dot leaves the server in its
initial state (RFC 5321 §4.1.1.4), so the next MAIL follows at once; one that ended
otherwise (every recipient refused, DATA refused) is reset with RSET first. A server that
closed an idle session is noticed by the delivery, which then opens a new one (deliver.py). A busy gateway or MX thus sees a few long sessions rather than one per message. Idle
sessions are bounded in number (the delivery concurrency) and time; a session is not reused
after ``REUSE_LIMIT`` seconds, so a server's per-connection limits and a reload on its side
are met in time. A session that fails its RSET is closed and another (or a new connection)
is used: nothing is ever sent on a session whose state is in doubt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import aiosmtplib

IDLE_LIMIT = 2.0  # Postfix's smtp_connection_cache_time_limit
REUSE_LIMIT = 300.0  # Postfix's smtp_connection_reuse_time_limit


@dataclass
class Session:
    """An open, authenticated SMTP session and what was negotiated on it."""

    client: aiosmtplib.SMTP
    channel: str  # "verified", "encrypted" or "" (plaintext), as deliver.Result.tls
    opened: float
    clean: bool = True  # the last transaction ended with the final reply to its DATA
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class ConnectionCache:
    """Idle sessions by destination key (host, TLS level, credentials)."""

    def __init__(
        self,
        *,
        max_idle: int,
        idle_limit: float = IDLE_LIMIT,
        reuse_limit: float = REUSE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_idle = max_idle
        self._idle_limit = idle_limit
        self._reuse_limit = reuse_limit
        self._clock = clock
        self._idle: dict[Hashable, list[Session]] = {}
        self._count = 0
        self._quitting: set[asyncio.Task[None]] = set()
        self._closed = False
        self.reused = 0  # sessions taken from the cache, for tests and the bench

    @property
    def idle(self) -> int:
        return self._count

    def _pop(self, key: Hashable) -> Session | None:
        sessions = self._idle.get(key)
        if not sessions:
            return None
        session = sessions.pop()  # the most recently used: the least likely to have timed out
        if not sessions:
            del self._idle[key]
        self._count -= 1
        if session._timer is not None:
            session._timer.cancel()
            session._timer = None
        return session

    async def take(self, key: Hashable) -> Session | None:
        """An idle session for ``key`` in the initial state (RSET first when its last
        transaction did not end cleanly), or None."""
        while (session := self._pop(key)) is not None:
            if session.client.is_connected:
                if not session.clean:
                    try:
                        await session.client.rset()
                    except (aiosmtplib.SMTPException, OSError, TimeoutError):
                        session.client.close()
                        continue
                    session.clean = True
                self.reused += 1
                return session
            session.client.close()
        return None

    def put(self, key: Hashable, session: Session) -> bool:
        """Keep ``session`` for the next message to ``key``; False when it must be closed
        instead (cache full, session too old, relay stopping)."""
        if (
            self._closed
            or self._count >= self._max_idle
            or not session.client.is_connected
            or self._clock() - session.opened >= self._reuse_limit
        ):
            return False
        session._timer = asyncio.get_running_loop().call_later(
            self._idle_limit, self._expire, key, session
        )
        self._idle.setdefault(key, []).append(session)
        self._count += 1
        return True

    def _expire(self, key: Hashable, session: Session) -> None:
        sessions = self._idle.get(key, [])
        if session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._idle[key]
            self._count -= 1
            self._quit(session.client)

    def _quit(self, client: aiosmtplib.SMTP) -> None:
        task = asyncio.get_running_loop().create_task(quit_politely(client))
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    async def close(self) -> None:
        """QUIT every idle session; keep none from now on."""
        self._closed = True
        for key in list(self._idle):
            while (session := self._pop(key)) is not None:
                self._quit(session.client)
        if self._quitting:
            await asyncio.gather(*self._quitting, return_exceptions=True)


async def quit_politely(client: aiosmtplib.SMTP) -> None:
    """QUIT, or just close a session that is already broken."""
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
