"""handlers: the reconcile workers run as many reconciles at once as there are workers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, cast

import pytest
from smtprelay_operator import handlers, reconcile
from smtprelay_operator.workqueue import Backoff, WorkQueue

from tests.operator.test_workqueue import until


async def test_every_worker_reconciles_at_the_same_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight workers, eight reconciles blocked on a slow API server at once (asyncio's
    default executor, six threads on two CPUs, capped them at six). The reconcile is a
    stand-in that waits for all eight: a real API server is not slow on demand."""
    workers = 8
    barrier = threading.Barrier(workers, timeout=5)
    done: list[str] = []

    def blocked(context: Any, namespace: str, name: str, *, urgent: bool) -> bool:
        barrier.wait()
        done.append(name)
        return True

    monkeypatch.setattr(reconcile, "reconcile", blocked)
    queue: WorkQueue[tuple[str, str]] = WorkQueue(backoff=Backoff(base=60), resync=3600)
    for index in range(workers):
        queue.add(("team", f"relay-{index}"))
    executor = handlers.reconcile_executor(workers)
    work = handlers.worker(cast(reconcile.Context, None), queue, executor)
    task = asyncio.create_task(queue.run(work, workers=workers))
    try:
        await until(lambda: len(done) == workers or barrier.broken, timeout=10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        executor.shutdown(wait=False, cancel_futures=True)
    assert not barrier.broken
    assert sorted(done) == [f"relay-{index}" for index in range(workers)]
