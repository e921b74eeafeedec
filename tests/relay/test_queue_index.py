"""The queue side of the spool, tested directly: state files, listings, the schedule's index,
``queue flush`` without a relay. (With a live relay: test_queue_admin.py, test_durability.py.)"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from smtprelay import admin, mailq
from smtprelay.config import parse_config
from smtprelay.route import MxResolver
from smtprelay.schedule import Scheduler, Setup
from smtprelay.spool import QueueState, Spool, oldest_age


def _fill(queue: Spool, count: int) -> list[str]:
    async def fill() -> list[str]:
        return [
            (await queue.enqueue(sender="a@x.test", recipients=("b@y.test",), data=b"x")).id
            for _ in range(count)
        ]

    return asyncio.run(fill())


def _listing(spool: Path) -> str:
    out = io.StringIO()
    mailq.write(spool, out, fork=False)
    return out.getvalue()


def _scheduler(queue: Spool, tmp_path: Path) -> Scheduler:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    setup = Setup(
        settings=parse_config({}),
        hostname="relay.test",
        resolver=MxResolver([], resolv_conf=resolv),
    )
    return Scheduler(spool=queue, setup=lambda: setup)


class TestStateFile:
    def test_a_shorter_state_replaces_a_longer_one_whole(self, tmp_path: Path) -> None:
        """The state is overwritten in place; a shorter one is read back exactly, not
        followed by the old one's tail."""
        queue = Spool(tmp_path)
        [queue_id] = _fill(queue, 1)
        queue.save_state(
            queue_id, QueueState(attempts=9, delivered=frozenset({"long-name@x.test"}), warned=True)
        )
        queue.save_state(queue_id, QueueState(attempts=2))
        assert Spool(tmp_path).load_state(queue_id) == QueueState(attempts=2)

    def test_a_deferral_rewrites_the_state_file_in_place(self, tmp_path: Path) -> None:
        """No temporary file renamed over the old one (ext4 starts writing at such a
        rename, ~0.6 ms of CPU per deferral): the same file, and nothing left beside it."""
        queue = Spool(tmp_path)
        [queue_id] = _fill(queue, 1)
        queue.defer(queue_id, QueueState(attempts=1), time.time() + 60)
        path = tmp_path / "state" / f"{queue_id}.json"
        inode = path.stat().st_ino
        queue.defer(queue_id, QueueState(attempts=2), time.time() + 120)
        assert path.stat().st_ino == inode
        assert os.listdir(tmp_path / "state") == [path.name]
        assert queue.load_state(queue_id).attempts == 2


class TestListing:
    def test_census_counts_messages_and_names_the_oldest(self, tmp_path: Path) -> None:
        """Only the relay's queue files count: not a temporary file, not a stray one."""
        queue = Spool(tmp_path)
        ids = _fill(queue, 3)
        (tmp_path / "queue" / f".tmp-{ids[0]}.eml").write_bytes(b"partial")
        (tmp_path / "queue" / "backup.eml").write_bytes(b"not ours")
        assert queue.census() == (3, min(ids))
        assert sorted(queue.names()) == queue.ids() == sorted(ids)
        assert Spool(tmp_path / "empty").census() == (0, None)
        assert oldest_age(None, time.time()) == 0.0
        assert 0 <= oldest_age(min(ids), time.time()) < 60

    def test_a_costly_census_is_reused_for_twenty_times_its_cost(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """However often it is asked (a scrape every 0.25 s), a listing that takes 50 ms is
        taken again only after a second; a cheap one stays fresh."""
        queue = Spool(tmp_path)
        _fill(queue, 2)
        assert queue.recent_census()[0] == 2
        _fill(queue, 1)
        deadline = time.monotonic() + 5
        while queue.recent_census()[0] != 3:  # a cheap listing is redone within milliseconds
            assert time.monotonic() < deadline
        listings: list[float] = []
        census = queue.census
        clock = [1000.0]  # the census's clock, advanced by the test: no real waiting

        def costly() -> tuple[int, str | None]:
            listings.append(clock[0])
            clock[0] += 0.05  # the cost of a long listing
            return census()

        monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # queuefiles reads it
        monkeypatch.setattr(queue, "census", costly)
        queue._census = None
        begin = clock[0]
        while clock[0] < begin + 0.5:  # a scrape every 0.01 s of that clock
            assert queue.recent_census()[0] == 3
            clock[0] += 0.01
        assert len(listings) == 1


class TestSchedule:
    def test_load_indexes_the_shard_at_its_due_times(self, tmp_path: Path) -> None:
        """A start takes every message in, each at its file's due time, one heap entry each."""
        queue = Spool(tmp_path)
        ids = _fill(queue, 5)
        later = time.time() + 3600
        for queue_id in ids[:3]:
            queue.defer(queue_id, QueueState(attempts=1), later)
        scheduler = _scheduler(Spool(tmp_path), tmp_path)
        assert scheduler.load() == 5
        assert scheduler.queued == 5
        assert len(scheduler._heap) == 5
        assert scheduler.oldest_due() == pytest.approx(
            min(os.stat(queue.queue_dir / f"{i}.eml").st_mtime for i in ids)
        )
        assert sorted(due for due, _ in scheduler._heap)[-1] == pytest.approx(later)

    def test_flush_makes_all_due_without_stale_entries(self, tmp_path: Path) -> None:
        """A flush leaves one heap entry a message, all due now, however often it runs."""
        queue = Spool(tmp_path)
        ids = _fill(queue, 4)
        for queue_id in ids:
            queue.defer(queue_id, QueueState(attempts=1), time.time() + 3600)
        scheduler = _scheduler(queue, tmp_path)
        scheduler.load()
        for _ in range(3):
            assert scheduler.flush() == 4
        assert sorted(scheduler._heap) == [(0.0, queue_id) for queue_id in sorted(ids)]


class TestFlushCommand:
    def test_without_a_relay_flush_marks_every_message_due_on_disk(self, tmp_path: Path) -> None:
        """No relay to tell: the next start finds every message due."""
        queue = Spool(tmp_path)
        ids = _fill(queue, 3)
        for queue_id in ids:
            queue.defer(queue_id, QueueState(attempts=1), time.time() + 3600)
        assert admin.flush(queue) == (3, None)
        assert all(entry.due <= time.time() for entry in Spool(tmp_path).scan())


class TestQueueList:
    def test_rows_show_pending_recipients_and_survive_a_torn_envelope(self, tmp_path: Path) -> None:
        """Settled recipients are not listed; an unreadable queue file is a row saying so,
        not a crash of the whole listing."""
        queue = Spool(tmp_path)
        envelope = asyncio.run(
            queue.enqueue(sender="", recipients=("a@x.test", "b@x.test"), data=b"hello")
        )
        queue.save_state(envelope.id, QueueState(attempts=3, delivered=frozenset({"a@x.test"})))
        torn = f"{envelope.id[:11]}ffffffffff"
        (tmp_path / "queue" / f"{torn}.eml").write_bytes(b'{"id": "' + torn.encode())
        listing = _listing(tmp_path).splitlines()
        assert listing[0] == mailq.HEADER
        first = listing.index(next(line for line in listing if line.startswith(envelope.id)))
        assert listing[first].split()[-2:] == ["3", "<>"]
        assert listing[first + 1].strip() == "b@x.test"
        assert any(line.startswith(torn) and "(unreadable envelope)" in line for line in listing)
        assert listing[-1] == "-- 2 message(s)"
        assert _listing(tmp_path / "none") == "Mail queue is empty\n"

    def test_queue_list_starts_without_the_spool_writer(self, tmp_path: Path) -> None:
        """`queue list` imports neither asyncio nor the spool's writer nor the queue side's
        bookkeeping, not even dataclasses, typing or (in its plain form) argparse: run by
        hand and by scripts, it should start at once."""
        Spool(tmp_path)
        probe = (
            "import sys; from smtprelay.cli import main; "
            f"main(['queue', '--spool', {str(tmp_path)!r}, 'list']); "
            "print(sorted(m for m in ('asyncio', 'smtprelay.spool', 'pydantic', "
            "'smtprelay.queuefiles', 'dataclasses', 'typing', 'argparse') if m in sys.modules))"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
        )
        assert result.stdout.splitlines() == ["Mail queue is empty", "[]"]
