"""The relay's pure parts and its spool, tested directly: routing, reports, the queue files."""

from __future__ import annotations

import asyncio
import email
import email.policy
import errno
import json
import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from smtprelay import bounce, queuefiles, spool
from smtprelay.config import parse_config
from smtprelay.dsn import MailOptions, RecipientOptions
from smtprelay.route import choose_route, group_by_route, uses_gateway
from smtprelay.spool import QueueState, Spool


class TestRoute:
    def test_direct_until_tries_before_gateway_then_gateway(self) -> None:
        """Attempts 1..triesBeforeGateway go direct, every later one to the gateway."""
        settings = parse_config({"gateway": {"host": "gw.test:2525", "triesBeforeGateway": 2}})
        kinds = [choose_route(settings, "a@x.test", n).kind for n in (1, 2, 3, 4)]
        assert kinds == ["direct", "direct", "gateway", "gateway"]
        assert choose_route(settings, "a@x.test", 3).port == 2525

    def test_send_all_uses_the_gateway_from_the_first_attempt(self) -> None:
        """sendAll: no attempt goes direct."""
        settings = parse_config({"gateway": {"host": "gw.test", "sendAll": True}})
        route = choose_route(settings, "a@x.test", 1)
        assert (route.kind, route.name, route.port) == ("gateway", "gw.test", 25)

    def test_without_a_gateway_every_attempt_is_direct(self) -> None:
        """No gateway host: triesBeforeGateway has nothing to hand over to."""
        settings = parse_config({})
        assert not any(uses_gateway(settings, n) for n in range(1, 30))

    def test_recipients_are_grouped_by_destination(self) -> None:
        """One group (one connection) per domain; case does not split a domain."""
        settings = parse_config({"delivery": {"port": 2500}})
        groups = group_by_route(settings, ("a@x.test", "b@X.TEST", "c@y.test"), 1)
        assert sorted(groups.values()) == [("a@x.test", "b@X.TEST"), ("c@y.test",)]
        assert {route.port for route in groups} == {2500}


class TestReport:
    def _report(self) -> email.message.EmailMessage:
        raw = bounce.build_report(
            queue_id="q1",
            sender="alice@sender.test",
            failures=[bounce.Failure("bob@x.test", "5.1.1", "550 5.1.1 unknown", "mx.x.test")],
            headers=bounce.original_headers(b"Subject: hi\r\nFrom: alice@sender.test\r\n\r\nbody"),
            hostname="relay.test",
            arrival=0.0,
            now=1.0,
        )
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message

    def test_report_is_rfc3464_multipart(self) -> None:
        """multipart/report; report-type=delivery-status with the three parts in order."""
        message = self._report()
        assert message.get_content_type() == "multipart/report"
        assert message.get_param("report-type") == "delivery-status"
        assert [p.get_content_type() for p in message.iter_parts()] == [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers",
        ]

    def test_report_carries_status_and_only_the_headers(self) -> None:
        """The per-recipient fields are present and the body of the original is not."""
        message = self._report()
        parts = list(message.iter_parts())
        status = parts[1].as_string()
        for line in (
            "Reporting-MTA: dns; relay.test",
            "Final-Recipient: rfc822; bob@x.test",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx.x.test",
            "Diagnostic-Code: smtp; 550 5.1.1 unknown",
        ):
            assert line in status
        headers = parts[2].get_payload()
        assert "Subject: hi" in headers
        assert "body" not in headers
        assert message["Auto-Submitted"] == "auto-replied"

    @pytest.mark.parametrize(
        ("code", "text", "status"),
        [(550, "5.1.1 no such user", "5.1.1"), (554, "rejected", "5.0.0"), (451, "x", "4.0.0")],
    )
    def test_status_comes_from_the_reply(self, code: int, text: str, status: str) -> None:
        """An enhanced status code in the reply is used, else one derived from the code."""
        assert bounce.status_for(code, text) == status


class TestSpool:
    def test_envelopes_of_older_relays_still_read(self) -> None:
        """A queue file's envelope line without options (queued before DSN support) reads
        as no DSN parameters; one with them round-trips."""
        old = b'{"id":"q1","sender":"a@x.test","recipients":["b@y.test"],"received":1.0}'
        envelope = spool.decode_envelope(old)
        assert envelope.options == MailOptions()
        assert envelope.options_of("b@y.test").wants("FAILURE")
        new = replace(
            envelope,
            options=MailOptions(ret="HDRS", envid="e1", smtputf8=True),
            recipient_options=(RecipientOptions(notify=("NEVER",), orcpt="rfc822;B@y.test"),),
        )
        assert spool.decode_envelope(spool.encode_envelope(new)) == new
        assert not new.options_of("b@y.test").wants("FAILURE")

    def test_state_files_of_older_relays_still_read(self) -> None:
        """A state file without 'warned' (written before delayWarning) reads as not warned."""
        old = b'{"attempts": 2, "delivered": ["a@x.test"], "failed": []}'
        state = queuefiles.decode_state(old)
        assert (state.attempts, state.warned) == (2, False)
        assert queuefiles.decode_state(queuefiles.encode_state(replace(state, warned=True))).warned

    def test_enqueued_message_is_on_disk_with_its_envelope(self, tmp_path: Path) -> None:
        """After enqueue returns, a reader of the directory sees envelope and content."""
        queue = Spool(tmp_path)
        envelope = asyncio.run(
            queue.enqueue(sender="a@x.test", recipients=("b@y.test",), data=b"Subject: s\r\n\r\nb")
        )
        again = Spool(tmp_path)
        read_envelope, data = again.read(envelope.id)
        assert read_envelope == envelope
        assert data == b"Subject: s\r\n\r\nb"
        assert [entry.id for entry in again.scan()] == [envelope.id]

    @pytest.mark.parametrize("size", [100, spool.SPILL_AT * 3 + 17])
    def test_a_received_message_declares_its_length_and_reads_back_whole(
        self, tmp_path: Path, size: int
    ) -> None:
        """Small (written once, at the commit) or spilled as it arrived (the length written
        over its placeholder): the file declares its own size and the message reads back
        as received, without the envelope line."""
        queue = Spool(tmp_path)
        body = b"Subject: s\r\n\r\n" + b"x" * size

        async def receive() -> str:
            draft = queue.draft(
                sender="a@x.test", recipients=("b@y.test",), client="192.0.2.1", queue_id="q1"
            )
            for start in range(0, len(body), 4096):
                await draft.write(body[start : start + 4096])
            return (await queue.commit(draft)).id

        queue_id = asyncio.run(receive())
        path = tmp_path / "queue" / f"{queue_id}.eml"
        line = path.read_bytes().partition(b"\n")[0]
        assert json.loads(line)["length"] == path.stat().st_size
        with queue.locked(queue_id) as present:
            assert present
            envelope, message = queue.open_message(queue_id)
        assert envelope.sender == "a@x.test"
        assert path.read_bytes()[message.offset :] == body
        assert queue.read(queue_id)[1] == body

    def test_a_message_being_received_is_busy_and_a_discarded_one_leaves_nothing(
        self, tmp_path: Path
    ) -> None:
        """The draft's file exists under its final name as soon as it spills; until the
        commit lets go of it, an attempt finds it busy and cannot take it for a message."""
        queue = Spool(tmp_path)

        async def spill() -> spool.Draft:
            draft = queue.draft(sender="", recipients=("b@y.test",), client="", queue_id="q2")
            await draft.write(b"x" * spool.SPILL_AT)
            return draft

        draft = asyncio.run(spill())
        assert queue.contains("q2")
        with pytest.raises(spool.Busy), queue.locked("q2"):
            pass
        draft.discard()
        assert not queue.contains("q2")
        assert list((tmp_path / "queue").iterdir()) == []

    def test_a_file_whose_size_is_not_its_declared_length_is_incomplete(
        self, tmp_path: Path
    ) -> None:
        queue = Spool(tmp_path)

        async def receive() -> str:
            draft = queue.draft(sender="", recipients=("b@y.test",), client="", queue_id="q3")
            await draft.write(b"Subject: s\r\n\r\nbody\r\n")
            return (await queue.commit(draft)).id

        queue_id = asyncio.run(receive())
        path = tmp_path / "queue" / f"{queue_id}.eml"
        path.write_bytes(path.read_bytes()[:-3])  # what a crash before the fsync may leave
        with queue.locked(queue_id), pytest.raises(spool.Incomplete, match="declares") as young:
            queue.open_message(queue_id)
        assert young.value.young  # its writer may be about to lock it
        hour_ago = time.time() - 3600
        os.utime(path, (hour_ago, hour_ago))
        with queue.locked(queue_id), pytest.raises(spool.Incomplete) as old:
            queue.open_message(queue_id)
        assert not old.value.young  # what a crash left
        raw = re.sub(rb'"length": *[0-9]+', b'"length":"12"', path.read_bytes(), count=1)
        path.write_bytes(raw)  # hostile: a length that is not a number
        with queue.locked(queue_id), pytest.raises(ValueError, match="not a number"):
            queue.open_message(queue_id)

    def test_concurrent_messages_share_directory_fsyncs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Forty messages enqueued at once need fewer than forty directory fsyncs."""
        calls: list[Path] = []
        real = spool._fsync_dir

        def counting(path: Path) -> None:
            calls.append(path)
            real(path)

        monkeypatch.setattr(spool, "_fsync_dir", counting)
        queue = Spool(tmp_path)

        async def burst() -> None:
            await asyncio.gather(
                *(
                    queue.enqueue(sender="a@x.test", recipients=("b@y.test",), data=b"x" * 2048)
                    for _ in range(40)
                )
            )

        asyncio.run(burst())
        assert len(list(queue.ids())) == 40
        assert 1 <= len(calls) < 40

    def test_a_writer_arriving_during_an_fsync_waits_for_the_next(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The running fsync may have begun before a later rename, so a writer that arrives
        while it runs is released only by an fsync that began after it arrived."""
        began: list[int] = []
        first_running, release_first = threading.Event(), threading.Event()

        def fsync(path: Path) -> None:
            began.append(len(began) + 1)
            if len(began) == 1:
                first_running.set()
                assert release_first.wait(10)

        monkeypatch.setattr(spool, "_fsync_dir", fsync)
        group = spool._GroupSync(tmp_path)
        done: dict[str, int] = {}

        def writer(name: str) -> None:
            group.sync()
            done[name] = len(began)  # how many fsyncs had begun when it was released

        first = threading.Thread(target=writer, args=("a",))
        first.start()
        assert first_running.wait(10)
        second = threading.Thread(target=writer, args=("b",))
        second.start()
        release_first.set()
        first.join(10)
        second.join(10)
        assert began == [1, 2]
        assert done["b"] == 2  # not released by the fsync that was running when it came

    @pytest.mark.parametrize("alone", [False, True], ids=["writer-thread", "alone-on-loop"])
    def test_a_commit_fsyncs_the_file_then_the_directory_before_it_returns(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alone: bool
    ) -> None:
        """The 250 waits for the file's fsync and the directory's, whether the commit runs
        in a writer thread or, for a session alone on its loop, on the loop itself (no
        thread hop). The lone commit stays on the loop's thread; a message that spilled
        to disk while it arrived still goes to a writer thread."""
        synced: list[tuple[str, str]] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(("file", threading.current_thread().name))
            real_fsync(fd)

        def fsync_dir(path: Path) -> None:
            synced.append(("directory", threading.current_thread().name))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                real_fsync(fd)
            finally:
                os.close(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(spool, "_fsync_dir", fsync_dir)
        queue = Spool(tmp_path)

        async def receive(queue_id: str, size: int) -> list[tuple[str, str]]:
            draft = queue.draft(sender="", recipients=("b@y.test",), client="", queue_id=queue_id)
            await draft.write(b"Subject: s\r\n\r\n" + b"x" * size)
            synced.clear()
            await queue.commit(draft, alone=alone)
            return list(synced)

        small = asyncio.run(receive("q4", 100))
        assert [kind for kind, _ in small] == ["file", "directory"]
        loop_thread = threading.main_thread().name
        assert all((thread == loop_thread) is alone for _, thread in small), small
        spilled = asyncio.run(receive("q5", spool.SPILL_AT + 1))
        assert [kind for kind, _ in spilled] == ["file", "directory"]
        assert all(thread != loop_thread for _, thread in spilled), spilled
        for queue_id in ("q4", "q5"):
            with queue.locked(queue_id) as present:
                assert present
                queue.open_message(queue_id)  # complete: its declared length is its size

    def test_a_commit_whose_session_is_gone_lets_go_of_the_file_once_durable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The client vanishes (its session's task is cancelled) while a writer thread
        makes its message durable: the message is kept and, once the writer is done, let
        go of, so another worker can deliver it; it must not stay locked by this process.
        The fsync is held until the test lets it finish (a stand-in: a real disk cannot be
        made to be slow on cue)."""
        entered, finish = threading.Event(), threading.Event()
        real_sync = spool.Draft.sync

        def slow_sync(draft: spool.Draft) -> None:
            entered.set()
            assert finish.wait(10)
            real_sync(draft)

        monkeypatch.setattr(spool.Draft, "sync", slow_sync)
        queue = Spool(tmp_path)

        async def vanish() -> bool:
            draft = queue.draft(sender="", recipients=("b@y.test",), client="", queue_id="q7")
            await draft.write(b"Subject: s\r\n\r\nbody\r\n")
            session = asyncio.ensure_future(queue.commit(draft))
            assert await asyncio.to_thread(entered.wait, 10)
            session.cancel()
            with pytest.raises(asyncio.CancelledError):
                await session
            finish.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with queue.locked("q7") as present:
                        return present
                except spool.Busy:
                    await asyncio.sleep(0.01)
            return False

        assert asyncio.run(vanish())
        with queue.locked("q7"):
            queue.open_message("q7")  # whole: its declared length is its size

    @pytest.mark.parametrize("path", ["enqueue", "lone-commit"])
    def test_a_failed_directory_fsync_refuses_the_message(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
    ) -> None:
        """When the directory cannot be fsynced the enqueue, or the commit of a session
        alone on its loop, fails and leaves no message."""

        def failing(path: Path) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(spool, "_fsync_dir", failing)
        queue = Spool(tmp_path)

        async def receive() -> None:
            if path == "enqueue":
                await queue.enqueue(sender="", recipients=("a@x.test",), data=b"x")
                return
            draft = queue.draft(sender="", recipients=("b@y.test",), client="", queue_id="q6")
            await draft.write(b"Subject: s\r\n\r\nbody\r\n")
            await queue.commit(draft, alone=True)

        with pytest.raises(OSError, match="I/O error"):
            asyncio.run(receive())
        assert list((tmp_path / "queue").iterdir()) == []

    def test_state_records_progress_and_pending_recipients(self, tmp_path: Path) -> None:
        """Saved state survives a new Spool object; pending excludes settled recipients."""
        queue = Spool(tmp_path)
        envelope = asyncio.run(
            queue.enqueue(sender="", recipients=("a@x.test", "b@x.test", "c@x.test"), data=b"")
        )
        state = QueueState(
            attempts=2, delivered=frozenset({"a@x.test"}), failed=frozenset({"b@x.test"})
        )
        queue.save_state(envelope.id, state)
        loaded = Spool(tmp_path).load_state(envelope.id)
        assert loaded == state
        assert loaded.pending(envelope) == ("c@x.test",)

    def test_torn_state_file_means_start_over_not_crash(self, tmp_path: Path) -> None:
        """A half-written state file reads as 'nothing recorded yet'."""
        queue = Spool(tmp_path)
        envelope = asyncio.run(queue.enqueue(sender="", recipients=("a@x.test",), data=b""))
        (tmp_path / "state" / f"{envelope.id}.json").write_text('{"attempts": 3, "du')
        assert queue.load_state(envelope.id) == QueueState()

    def test_orphans_of_a_crash_are_cleaned(self, tmp_path: Path) -> None:
        """Temporary files and state without a message are removed at start."""
        queue = Spool(tmp_path)
        (tmp_path / "queue" / ".tmp-abc.eml").write_bytes(b"partial")
        (tmp_path / "state" / "gone.json").write_text("{}")
        assert queue.remove_orphans() == 2
        assert list(queue.ids()) == []
        assert list((tmp_path / "state").iterdir()) == []

    def test_a_deferred_message_keeps_its_due_time_for_the_next_start(self, tmp_path: Path) -> None:
        """New messages are due at once; a deferred one is due when its attempt said,
        which a fresh scan (a restart) reads back without opening any file."""
        queue = Spool(tmp_path)
        fresh, deferred = (
            asyncio.run(queue.enqueue(sender="", recipients=("a@x.test",), data=b""))
            for _ in range(2)
        )
        later = fresh.received + 3600
        queue.defer(deferred.id, QueueState(attempts=1), later)
        due = {entry.id: entry.due for entry in Spool(tmp_path).scan()}
        assert due[fresh.id] <= fresh.received + 1
        assert due[deferred.id] == pytest.approx(later)
        assert Spool(tmp_path).load_state(deferred.id).attempts == 1

    def test_ids_sort_by_arrival(self) -> None:
        """Queue ids order as their arrival times do."""
        ids = [spool.new_queue_id(t) for t in (1.0, 2.5, 1000.0, 1e9)]
        assert ids == sorted(ids)
