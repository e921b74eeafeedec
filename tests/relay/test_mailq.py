"""``smtprelay queue list`` (mailq.py, forkmerge.py): hostile queue files give a row naming
them, never a crash, a hang or a forged row; the listing split over two processes is the
single process's, byte for byte."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from smtprelay import forkmerge, mailq
from smtprelay.cli import main
from smtprelay.spool import SPILL_AT, Draft, QueueState, Spool

NOW = 1_796_000_000.0


def _listing(spool: Path, *, fork: bool, chunk: int = mailq.CHUNK) -> str:
    out = io.StringIO()
    mailq.write(spool, out, fork=fork, chunk=chunk)
    return out.getvalue()


def _command(spool: Path, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """``smtprelay queue --spool SPOOL list`` as a user runs it."""
    command = [*prefix, sys.executable, "-m", "smtprelay", "queue", "--spool", str(spool), "list"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _queue_id(number: int) -> str:
    """An id of the relay's shape (21 hex digits); ``number`` orders them."""
    return f"{number:021x}"


def _envelope(queue_id: str, **fields: object) -> bytes:
    envelope: dict[str, object] = {"id": queue_id, "sender": "a@x.test", "recipients": ["b@y.test"]}
    envelope |= {"received": NOW, "client": ""} | fields
    return json.dumps(envelope).encode() + b"\nSubject: t\r\n\r\nhello\r\n"


class _Hostile:
    """A spool with one real message (through `Spool`) and, around it, a file of each
    hostile kind; ``rows`` maps each id to the row its listing must show."""

    def __init__(self, root: Path) -> None:
        spool = Spool(root)
        real = asyncio.run(spool.enqueue(sender="s@x.test", recipients=("r@y.test",), data=b"x"))
        spool.save_state(real.id, QueueState(attempts=2))
        self.root, self.queue, self.state = root, root / "queue", root / "state"
        self.rows: dict[str, str] = {real.id: "    2  s@x.test"}
        self._number = 0

    def file(self, content: bytes, row: str, *, state: bytes | None = None) -> str:
        queue_id = self._next()
        (self.queue / f"{queue_id}.eml").write_bytes(content)
        if state is not None:
            (self.state / f"{queue_id}.json").write_bytes(state)
        self.rows[queue_id] = row
        return queue_id

    def envelope(self, row: str, *, state: bytes | None = None, **fields: object) -> str:
        queue_id = self._next()
        return self.file(_envelope(queue_id, **fields), row, state=state)

    def special(self, make: str, row: str) -> str:
        queue_id = self._next()
        path = self.queue / f"{queue_id}.eml"
        if make == "symlink":
            path.symlink_to("/dev/zero")
        elif make == "directory":
            path.mkdir()
        else:
            os.mkfifo(path)
        self.rows[queue_id] = row
        return queue_id

    def _next(self) -> str:
        self._number += 1
        return _queue_id(self._number)


def _copies(root: Path, count: int) -> _Hostile:
    """A spool of ``count`` messages: one real one (through `Spool`) and copies of its
    queue and state files under other ids."""
    spool = _Hostile(root)
    [real] = spool.rows
    for number in range(1, count):
        shutil.copyfile(spool.queue / f"{real}.eml", spool.queue / f"{_queue_id(number)}.eml")
        shutil.copyfile(spool.state / f"{real}.json", spool.state / f"{_queue_id(number)}.json")
    return spool


def _hostile_spool(root: Path) -> _Hostile:
    spool = _Hostile(root)
    spool.file(b'{"id": "torn', "(unreadable envelope)")
    spool.file(b"\xff\xfe" + _envelope("x")[2:], "(unreadable envelope)")
    spool.file(b"garbage\n", "(unreadable envelope)")
    spool.envelope("(unreadable envelope)", recipients=7)
    spool.envelope("(unreadable envelope)", received=1e300)  # beyond gmtime
    spool.file(b"{" * (2 * 1024 * 1024), "2097152 ?")  # no newline in 2 MiB: read 1 MiB of it
    spool.special("symlink", "(unreadable envelope: a symbolic link)")
    spool.special("directory", "(unreadable envelope: a directory)")
    spool.special("fifo", "(unreadable envelope: not a regular file)")
    spool.envelope(
        "a@x.test\\n000000000000000000099 forged", sender="a@x.test\n" + "0" * 19 + "99 forged"
    )
    spool.envelope("\\x1b[31mred\\udc80", sender="\x1b[31mred\udc80")
    many = [f"r{number:04d}@y.test" for number in range(400)]  # a head beyond 4 KiB
    spool.envelope(f"{' ' * 59}r0399@y.test", recipients=many)
    spool.file(b"[" * 100_000 + b"\n", "(unreadable envelope)")  # the decoder's recursion limit
    settled = json.dumps({"attempts": 5, "delivered": ["b@y.test"], "failed": [], "warned": True})
    spool.envelope(
        f"    5  a@x.test\n{' ' * 59}c@y.test",
        state=settled.encode(),
        recipients=["b@y.test", "c@y.test"],
    )
    spool.envelope("    0  a@x.test", state=b"\xff not a state")
    spool.envelope("    0  a@x.test", state=b'{"attempts": "many"}')
    spool.envelope("    0  a@x.test", state=b"[" * 100_000)
    return spool


def _blocks(listing: str) -> dict[str, str]:
    """Each message's lines (its row and recipients), by queue id."""
    blocks: dict[str, str] = {}
    queue_id = ""
    for line in listing.splitlines()[1:-1]:
        if line.startswith(" "):
            blocks[queue_id] += "\n" + line
        else:
            queue_id = line.split()[0]
            assert queue_id not in blocks, f"{queue_id} listed twice"
            blocks[queue_id] = line
    return blocks


class TestHostileFiles:
    def test_each_hostile_file_is_a_row_saying_what_it_is(self, tmp_path: Path) -> None:
        """Torn, not UTF-8, not JSON, wrong types, a time beyond gmtime, 2 MiB without a
        newline, a symlink, a directory, a FIFO: each a row; control characters escaped;
        settled recipients left out; a torn state counts as no attempt."""
        spool = _hostile_spool(tmp_path)
        listing = _listing(tmp_path, fork=False)
        lines = listing.splitlines()
        assert lines[0] == mailq.HEADER
        assert lines[-1] == f"-- {len(spool.rows)} message(s)"
        blocks = _blocks(listing)
        assert list(blocks) == sorted(spool.rows)  # no forged row, each once, in order
        for queue_id, row in spool.rows.items():
            assert row in blocks[queue_id], (queue_id, blocks[queue_id])
        assert all("b@y.test" not in block for block in blocks.values() if "    5 " in block)

    def test_the_command_lists_a_fifo_without_waiting(self, tmp_path: Path) -> None:
        """A FIFO is opened without blocking: the command ends (a timeout would fail)."""
        spool = _hostile_spool(tmp_path)
        result = _command(tmp_path)
        assert result.returncode == 0
        assert result.stdout == _listing(tmp_path, fork=False)
        assert f"-- {len(spool.rows)} message(s)" in result.stdout

    def test_an_unreadable_queue_directory_is_one_clear_error(self, tmp_path: Path) -> None:
        """``queue/`` that is not a directory: one line naming it, status 1, no traceback."""
        (tmp_path / "queue").write_bytes(b"not a directory")
        result = _command(tmp_path)
        assert result.returncode == 1
        assert result.stderr == f"smtprelay queue list: {tmp_path}/queue: Not a directory\n"

    def test_files_of_another_owner_are_read_without_o_noatime(self, tmp_path: Path) -> None:
        """``O_NOATIME`` is refused (EPERM) on another owner's files: the listing reopens
        without it and shows the same rows, forked or not. As root the files are given to
        nobody and the command runs without CAP_FOWNER (``setpriv``), which is what makes
        the kernel refuse; as another user, the files are that user's own."""
        spool = _copies(tmp_path, 1200)
        prefix: list[str] = []
        if os.geteuid() == 0:
            for path in [*spool.queue.iterdir(), *spool.state.iterdir()]:
                os.chown(path, 65534, 65534)
            prefix = ["setpriv", "--bounding-set=-fowner", "--inh-caps=-fowner"]
        listed = _command(tmp_path, prefix)
        assert listed.returncode == 0
        assert listed.stdout == _listing(tmp_path, fork=False)
        assert listed.stdout.endswith("-- 1200 message(s)\n")


class TestCommandLine:
    def test_the_plain_form_and_the_parser_give_the_same_listing(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``queue --spool DIR list`` is recognised without argparse; ``--spool=DIR`` goes
        through it: the same rows, and the same refusal of a directory that is not a spool."""
        _hostile_spool(tmp_path)
        assert main(["queue", "--spool", str(tmp_path), "list"]) == 0
        plain = capsys.readouterr().out
        assert main(["queue", f"--spool={tmp_path}", "list"]) == 0
        assert capsys.readouterr().out == plain == _listing(tmp_path, fork=False)
        missing = tmp_path / "missing"
        refusal = f"smtprelay queue: {missing} is not a spool directory\n"
        assert main(["queue", "--spool", str(missing), "list"]) == 1
        assert capsys.readouterr().err == refusal
        assert main(["queue", f"--spool={missing}", "list"]) == 1
        assert capsys.readouterr().err == refusal


class TestBeingReceived:
    def test_a_message_is_listed_once_its_declared_length_is_its_size(self, tmp_path: Path) -> None:
        """A draft that has spilled (its file under its final name, declaring length 0) is
        not listed, nor a file a crash cut short (declaring more than it holds); once
        committed the message is, with its size."""
        queue = Spool(tmp_path)
        receiving, cut = _queue_id(2), _queue_id(1)

        async def start() -> Draft:
            draft = queue.draft(
                sender="a@x.test", recipients=("b@y.test",), client="", queue_id=cut
            )
            await draft.write(b"Subject: s\r\n\r\nbody\r\n")
            await queue.commit(draft)
            draft = queue.draft(
                sender="a@x.test", recipients=("b@y.test",), client="", queue_id=receiving
            )
            await draft.write(b"x" * SPILL_AT)
            return draft

        draft = asyncio.run(start())
        path = tmp_path / "queue" / f"{cut}.eml"
        path.write_bytes(path.read_bytes()[:-3])  # what a crash before the fsync may leave
        assert (tmp_path / "queue" / f"{receiving}.eml").stat().st_size > SPILL_AT
        assert _listing(tmp_path, fork=False) == "Mail queue is empty\n"
        asyncio.run(queue.commit(draft))
        size = (tmp_path / "queue" / f"{receiving}.eml").stat().st_size
        blocks = _blocks(_listing(tmp_path, fork=False))
        assert list(blocks) == [receiving]
        assert blocks[receiving].split()[1] == str(size)


class TestTwoProcesses:
    @pytest.mark.parametrize("chunk", [1, 3])
    def test_the_forked_listing_is_the_single_process_one(self, tmp_path: Path, chunk: int) -> None:
        """Hostile files in either process's chunks: the same output, byte for byte."""
        spool = _hostile_spool(tmp_path)
        alone = _listing(tmp_path, fork=False)
        assert _listing(tmp_path, fork=True, chunk=chunk) == alone
        assert alone.endswith(f"-- {len(spool.rows)} message(s)\n")

    def test_a_long_queue_forks_by_default_and_keeps_the_order(self, tmp_path: Path) -> None:
        """Past `FORK_FROM` messages the command splits the work (on a machine with two
        processors) and its output is the single process's; a reader that stops early
        (``| head``) ends it quietly."""
        count = 1200  # ~150 KiB of rows: more than a pipe holds
        assert count >= mailq.FORK_FROM
        _copies(tmp_path, count)
        listed = _command(tmp_path)
        assert listed.returncode == 0
        assert listed.stdout == _listing(tmp_path, fork=False)
        assert listed.stdout.endswith(f"-- {count} message(s)\n")
        command = [sys.executable, "-m", "smtprelay", "queue", "--spool", str(tmp_path), "list"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as head:
            assert head.stdout is not None
            assert head.stderr is not None
            assert head.stdout.readline().decode() == mailq.HEADER + "\n"
            head.stdout.close()  # with more than the pipe holds still to write
            assert head.wait(timeout=60) == 1
            assert head.stderr.read() == b""


def _pid_of_chunk(items: Sequence[int]) -> tuple[bytes, int]:
    return f"{os.getpid()}:{','.join(map(str, items))};".encode(), len(items)


class TestForkMerge:
    def test_chunks_alternate_between_the_processes_in_order(self) -> None:
        """Every other chunk is the child's; the results come back in the list's order."""
        results = list(forkmerge.ordered(range(10), _pid_of_chunk, size=2, fork=True))
        assert [count for _, count in results] == [2, 2, 2, 2, 2]
        pids = [payload.decode().split(":")[0] for payload, _ in results]
        items = [payload.decode().split(":")[1] for payload, _ in results]
        assert items == ["0,1;", "2,3;", "4,5;", "6,7;", "8,9;"]
        assert pids[0::2] == [str(os.getpid())] * 3
        assert len(set(pids[1::2])) == 1
        assert pids[1] != str(os.getpid())

    def test_a_child_that_dies_leaves_its_chunks_to_the_parent(self) -> None:
        """The child exits after its first chunk (a fault a test must make: the real
        child only dies if killed): the parent computes the rest, nothing is lost."""
        parent = os.getpid()

        def work(items: Sequence[int]) -> tuple[bytes, int]:
            if os.getpid() != parent and items[0] >= 4:
                os._exit(3)
            return _pid_of_chunk(items)

        results = list(forkmerge.ordered(range(10), work, size=2, fork=True))
        items = [payload.decode().split(":")[1] for payload, _ in results]
        assert items == ["0,1;", "2,3;", "4,5;", "6,7;", "8,9;"]
        pids = [payload.decode().split(":")[0] for payload, _ in results]
        assert pids[1] != str(parent)
        assert pids[2:] == [str(parent)] * 3
