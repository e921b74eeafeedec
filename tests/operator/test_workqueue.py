"""workqueue: one worker per key at a time, backoff on failure, resync after success."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable

from smtprelay_operator.workqueue import Backoff, WorkQueue

Outcome = bool | float | None


class Recorder:
    """The work function: records calls (with their loop time) and answers from a script."""

    def __init__(self, answers: Callable[[str, int], Outcome]) -> None:
        self.calls: list[tuple[str, float]] = []
        self.urgent: list[bool] = []  # whether each call was told it is the urgent pass
        self.running: set[str] = set()
        self.overlapped = False
        self._answers = answers

    async def __call__(self, key: str, urgent: bool) -> Outcome:
        if key in self.running:
            self.overlapped = True
        self.running.add(key)
        self.calls.append((key, asyncio.get_running_loop().time()))
        self.urgent.append(urgent)
        await asyncio.sleep(0.02)
        self.running.discard(key)
        return self._answers(key, len([c for c in self.calls if c[0] == key]))


@contextlib.asynccontextmanager
async def serving(queue: WorkQueue[str], work: Recorder) -> AsyncIterator[None]:
    task = asyncio.create_task(queue.run(work, workers=3))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def one_worker(queue: WorkQueue[str], work: Recorder, *, calls: int) -> None:
    """Serve ``queue`` with one worker until ``work`` has been called ``calls`` times."""
    task = asyncio.create_task(queue.run(work, workers=1))
    try:
        await until(lambda: len(work.calls) == calls)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class TestBackoff:
    def test_doubles_up_to_the_cap(self) -> None:
        """1, 2, 4, ... seconds, never more than the cap."""
        backoff = Backoff(base=1.0, cap=300.0)
        assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
        assert backoff.delay(30) == 300.0


class TestWorkQueue:
    async def test_a_key_added_many_times_is_worked_once(self) -> None:
        """Adds while a key waits collapse into one piece of work."""
        work = Recorder(lambda key, n: True)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(), resync=3600)
        for _ in range(5):
            queue.add("a")
        async with serving(queue, work):
            await until(lambda: len(work.calls) == 1)
            await asyncio.sleep(0.1)
        assert [key for key, _ in work.calls] == ["a"]

    async def test_added_while_running_runs_again_after_never_alongside(self) -> None:
        """A change arriving mid-reconcile gets its own reconcile, after the first."""
        work = Recorder(lambda key, n: True)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(), resync=3600)
        queue.add("a")
        async with serving(queue, work):
            await until(lambda: "a" in work.running)
            queue.add("a")
            queue.add("a")
            await until(lambda: len(work.calls) == 2)
            await asyncio.sleep(0.1)
        assert len(work.calls) == 2
        assert not work.overlapped

    async def test_failure_is_retried_with_growing_delays(self) -> None:
        """False (or an exception) comes back after 2x the previous delay until it works."""

        def answers(key: str, n: int) -> Outcome:
            if n == 2:
                raise RuntimeError("API server said 500")
            return n >= 4

        work = Recorder(answers)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(base=0.05, cap=10), resync=3600)
        queue.add("a")
        async with serving(queue, work):
            await until(lambda: len(work.calls) == 4)
            await asyncio.sleep(0.3)
        times = [at for _, at in work.calls]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert len(work.calls) == 4, "settled work is not retried"
        # each gap: the 20 ms of work plus a backoff twice the one before
        assert [
            round(gap - 0.02, 2) >= want for gap, want in zip(gaps, (0.05, 0.1, 0.2), strict=True)
        ] == [True] * 3
        assert queue.failures("a") == 0

    async def test_settled_key_comes_back_after_the_resync_interval(self) -> None:
        """True: the key is looked at again after about the resync interval."""
        work = Recorder(lambda key, n: True)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(), resync=0.2, jitter=lambda: 0.5)
        queue.add("a")
        async with serving(queue, work):
            await until(lambda: len(work.calls) == 2)
        assert work.calls[1][1] - work.calls[0][1] >= 0.2

    async def test_gone_key_is_forgotten(self) -> None:
        """None (the SmtpRelay was deleted): no retry, no resync."""
        work = Recorder(lambda key, n: None)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(base=0.01), resync=0.05)
        queue.add("a")
        async with serving(queue, work):
            await until(lambda: len(work.calls) == 1)
            await asyncio.sleep(0.3)
        assert len(work.calls) == 1

    async def test_an_event_cuts_a_pending_backoff_short(self) -> None:
        """A watch event for a key waiting out its backoff brings it forward at once."""
        work = Recorder(lambda key, n: n > 1)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(base=60), resync=3600)
        queue.add("a")
        async with serving(queue, work):
            await until(lambda: len(work.calls) == 1 and not work.running)
            await asyncio.sleep(0.05)
            queue.add("a")
            await until(lambda: len(work.calls) == 2)

    async def test_urgent_keys_go_first_and_an_urgent_add_promotes(self) -> None:
        """New SmtpRelays before status refreshes: urgent keys are served first, in order,
        and a waiting key added again as urgent moves up."""
        work = Recorder(lambda key, n: True)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(), resync=3600)
        for key in ("s1", "s2", "s3"):
            queue.add(key)
        queue.add("n1", urgent=True)
        queue.add("s3", urgent=True)
        queue.add("n2", urgent=True)
        assert queue.waiting == 5
        await one_worker(queue, work, calls=5)
        assert [key for key, _ in work.calls] == ["n1", "s3", "n2", "s1", "s2"]

    async def test_a_deferred_key_comes_back_behind_the_urgent_ones(self) -> None:
        """A new SmtpRelay's urgent pass applies its pod's objects and defers the rest (0):
        the rest comes back as a non-urgent pass after every waiting urgent key, however
        many, behind what was waiting already (in order, like any other refresh)."""
        work = Recorder(lambda key, n: 0.0 if n == 1 and key.startswith("n") else True)
        queue: WorkQueue[str] = WorkQueue(backoff=Backoff(), resync=3600)
        queue.add("s1")
        for key in ("n1", "n2", "n3"):
            queue.add(key, urgent=True)
        await one_worker(queue, work, calls=7)
        assert [key for key, _ in work.calls] == ["n1", "n2", "n3", "s1", "n1", "n2", "n3"]
        assert work.urgent == [True, True, True, False, False, False, False]
        assert queue.failures("n1") == 0
