"""A rate-limited work queue of SmtpRelay keys, the way client-go's workqueue works.

Watch events only say *which* SmtpRelay needs a look; the workers then reconcile it from
its current state. A key is never worked on by two workers at once, a key added while it is
being worked on is worked on once more afterwards, a failure comes back after an
exponential backoff (not at a fixed rate forever), and a success comes back after the
resync interval, so a missed watch event is repaired eventually without any polling loop.
Keys added as urgent (a new or changed SmtpRelay) go before the others (a child's status
changed, a resync): when hundreds are created at once, each gets its objects before any
gets its status refreshed, and the refreshes wait long enough to be merged.

kopf's own retries (handler progress kept in annotations) and its timers and daemons
(which need a finalizer on every SmtpRelay) are not used for this on purpose: see
operator/README.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import random
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Backoff:
    """Per-key exponential backoff: ``base * 2**failures``, at most ``cap`` seconds."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.base * 2 ** max(0, failures - 1)))


class WorkQueue(Generic[Key]):
    """Keys waiting to be worked on, now or at a time of their own."""

    def __init__(
        self,
        *,
        backoff: Backoff,
        resync: float,
        clock: Callable[[], float] | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._backoff = backoff
        self._resync = resync
        self._clock = clock
        self._jitter = jitter
        self._urgent: collections.deque[Key] = collections.deque()
        self._ready: collections.deque[Key] = collections.deque()
        self._available = asyncio.Semaphore(0)  # one per key in either deque
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: dict[Key, bool] = {}  # key -> urgent
        self._later: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._tick = 0
        self._wake = asyncio.Event()

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def add(self, key: Key, *, urgent: bool = False) -> None:
        """Work on ``key`` as soon as a worker is free (once, however often it is added);
        ``urgent`` keys before the others."""
        self._due.pop(key, None)
        if key in self._active:
            self._dirty[key] = self._dirty.get(key, False) or urgent
        elif key not in self._queued:
            self._queued.add(key)
            (self._urgent if urgent else self._ready).append(key)
            self._available.release()
        elif urgent and key in self._ready:
            self._ready.remove(key)
            self._urgent.append(key)

    async def _take(self) -> tuple[Key, bool]:
        """The next key, and whether it was taken as urgent."""
        await self._available.acquire()
        if self._urgent:
            return self._urgent.popleft(), True
        return self._ready.popleft(), False

    def add_after(self, key: Key, delay: float) -> None:
        """Work on ``key`` after ``delay`` seconds, unless it is due earlier already."""
        at = self._now() + delay
        if key in self._queued or (key in self._due and self._due[key] <= at):
            return
        self._due[key] = at
        self._tick += 1
        heapq.heappush(self._later, (at, self._tick, key))
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Keys ready to be worked on now."""
        return len(self._urgent) + len(self._ready)

    def failures(self, key: Key) -> int:
        return self._failures.get(key, 0)

    def _done(self, key: Key, *, failed: bool, forget: bool, after: float | None = None) -> None:
        self._active.discard(key)
        if after is not None:
            self._failures.pop(key, None)
            if after > 0:
                self.add_after(key, after)
            else:  # behind the urgent keys, not before them
                self.add(key)
        elif forget:
            self._failures.pop(key, None)
            self._due.pop(key, None)
        elif failed:
            count = self._failures.get(key, 0) + 1
            self._failures[key] = count
            self.add_after(key, self._backoff.delay(count))
        else:
            self._failures.pop(key, None)
            # Spread resyncs out, so hundreds of SmtpRelays do not all come back at once.
            self.add_after(key, self._resync * (0.9 + 0.2 * self._jitter()))
        if key in self._dirty:
            self.add(key, urgent=self._dirty.pop(key))

    async def _promote(self) -> None:
        """Move keys whose time has come to the ready queue."""
        while True:
            now = self._now()
            while self._later and self._later[0][0] <= now:
                at, _, key = heapq.heappop(self._later)
                if self._due.get(key) == at:
                    del self._due[key]
                    self.add(key)
            timeout = self._later[0][0] - now if self._later else None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def run(
        self, work: Callable[[Key, bool], Awaitable[bool | float | None]], *, workers: int = 4
    ) -> None:
        """Serve keys forever with ``workers`` workers.

        ``work(key, urgent)`` (``urgent``: the key was taken from the urgent keys) returns
        True when the key is settled (resync later), False when it failed (back off), None
        when the key is gone (forget it), a number of seconds to come back after (0: as soon
        as the urgent keys are served); an exception counts as a failure.
        """

        async def worker() -> None:
            while True:
                key, urgent = await self._take()
                self._queued.discard(key)
                self._active.add(key)
                outcome: bool | float | None = False
                try:
                    outcome = await work(key, urgent)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    outcome = False
                after = (
                    float(outcome)
                    if isinstance(outcome, int | float) and not isinstance(outcome, bool)
                    else None
                )
                self._done(key, failed=outcome is False, forget=outcome is None, after=after)

        tasks = [asyncio.create_task(self._promote())]
        tasks += [asyncio.create_task(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
