"""``smtprelay queue list`` (mailq.py, forkmerge.py): hostile queue files give a row naming
them, never a crash, a hang or a forged row; the listing split over two processes is the
single process's, byte for byte."""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
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
    many_settled = json.dumps(
        {"attempts": 4, "delivered": many[:-1], "failed": [], "warned": False}
    ).encode()  # beyond the first 4 KiB read of a state file
    spool.envelope(f"    4  a@x.test\n{' ' * 59}r0399@y.test", state=many_settled, recipients=many)
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


class TestMemory:
    def test_huge_envelopes_are_listed_within_a_bounded_address_space(self, tmp_path: Path) -> None:
        """Twelve envelopes of 200,000 one-letter recipients (800 KB each, under
        `MAX_ENVELOPE`) make ~12 MB of rows each, 146 MB in all: written a piece at a
        time, the listing fits in 200 MiB of address space (forked or not), where holding a
        chunk's rows took more than 250."""
        Spool(tmp_path)
        for number in range(1, 13):
            queue_id = _queue_id(number)
            envelope = _envelope(queue_id, recipients=["a"] * 200_000)
            (tmp_path / "queue" / f"{queue_id}.eml").write_bytes(envelope)
        limit = 200 * 1024 * 1024

        def bounded() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        command = [sys.executable, "-m", "smtprelay", "queue", "--spool", str(tmp_path), "list"]
        listing = tmp_path / "listing"
        with listing.open("wb") as out:
            result = subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.PIPE,
                preexec_fn=bounded,
                timeout=120,
                check=False,
            )
        assert result.stderr == b""
        assert result.returncode == 0
        lines = 0
        with listing.open("rb") as written:
            while block := written.read(1 << 20):
                lines += block.count(b"\n")
            written.seek(-30, os.SEEK_END)
            assert written.read().endswith(b"\n-- 12 message(s)\n")
        assert lines == 12 * 200_001 + 2


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
    @pytest.mark.parametrize(("chunk", "piece"), [(1, mailq.PIECE), (3, mailq.PIECE), (5, 1)])
    def test_the_forked_listing_is_the_single_process_one(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, piece: int
    ) -> None:
        """Hostile files in either process's chunks, a chunk in one piece or a piece a
        message: the same output, byte for byte."""
        spool = _hostile_spool(tmp_path)
        alone = _listing(tmp_path, fork=False)
        monkeypatch.setattr(mailq, "PIECE", piece)
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


def _one_piece_each(items: Sequence[int]) -> Iterator[tuple[bytes, int, int]]:
    """A piece per item, naming the process that made it."""
    for done, item in enumerate(items, 1):
        yield f"{os.getpid()}:{item}".encode(), 1, done


def _made(results: list[tuple[bytes, int]]) -> list[tuple[int, int]]:
    """(item, pid) of each piece, in the order they came."""
    pairs = [payload.decode().split(":") for payload, _ in results]
    return [(int(item), int(pid)) for pid, item in pairs]


class TestForkMerge:
    def test_chunks_alternate_between_the_processes_in_order(self) -> None:
        """Every other chunk is the child's; the pieces come back in the list's order."""
        results = list(forkmerge.ordered(range(10), _one_piece_each, size=2, fork=True))
        made = _made(results)
        assert [item for item, _ in made] == list(range(10))
        assert [count for _, count in results] == [1] * 10
        parent = os.getpid()
        assert {pid for item, pid in made if item // 2 % 2 == 0} == {parent}
        [child] = {pid for item, pid in made if item // 2 % 2 == 1}
        assert child != parent

    def test_a_child_that_dies_leaves_its_chunks_to_the_parent(self) -> None:
        """The child exits at its second chunk (a fault a test must make: the real child
        only dies if killed): the parent does that chunk and the rest, nothing is lost."""
        parent = os.getpid()

        def work(items: Sequence[int]) -> Iterator[tuple[bytes, int, int]]:
            if os.getpid() != parent and items[0] >= 4:
                os._exit(3)
            yield from _one_piece_each(items)

        made = _made(list(forkmerge.ordered(range(10), work, size=2, fork=True)))
        assert [item for item, _ in made] == list(range(10))
        assert {pid for item, pid in made if item in (2, 3)} != {parent}
        assert {pid for item, pid in made if item >= 4} == {parent}

    def test_a_child_that_dies_inside_a_chunk_leaves_only_the_rest_of_it(self) -> None:
        """The child sent the first piece of its chunk [9, 10, 11] and died making the
        third: the parent does 10 and 11, and 9 is not listed twice."""
        parent = os.getpid()

        def work(items: Sequence[int]) -> Iterator[tuple[bytes, int, int]]:
            for piece in _one_piece_each(items):
                if os.getpid() != parent and piece[0].endswith(b":11"):
                    os._exit(3)
                yield piece

        made = _made(list(forkmerge.ordered(range(12), work, size=3, fork=True)))
        assert [item for item, _ in made] == list(range(12))
        assert parent not in {pid for item, pid in made if item in (3, 4, 5, 9)}
        assert {pid for item, pid in made if item in (10, 11)} == {parent}
