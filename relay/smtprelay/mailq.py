"""``smtprelay queue list``: every queued message, as ``mailq`` (``postqueue -p``) shows them.

Run by hand and by scripts against a queue of any length, so it costs what reading the
files costs and little more: one listing of ``queue/``, then per message one read of its
queue file's head (the envelope line) and one of its state file, each opened relative to
its directory; plain JSON decoding, no envelope objects. With a long queue and two
processors a forked child formats every other chunk (forkmerge.py). Imports ``json``,
``re`` and queuelayout.py, nothing else of the relay's. Measured in bench/README.md.

A queue file is the relay's own, but the listing trusts nothing in it: a symbolic link, a
directory, a FIFO or a device is a row naming it (opened without following links and
without blocking), an envelope that is torn, not UTF-8 or not JSON is a row saying so, a
huge one is read up to `MAX_ENVELOPE` and its rows written a `PIECE` at a time, and
control characters in an address are shown escaped, so no file can forge a row.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet

from smtprelay import forkmerge
from smtprelay.queuelayout import MAX_STATE, QUEUE, STATE, SUFFIX, envelope_line, queued_ids

TYPE_CHECKING = False  # typing itself costs a start ~5 ms
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, TextIO

_decode = json.JSONDecoder().raw_decode  # from a str, without json.loads' layers
_NOTHING = {"attempts": 0, "delivered": (), "failed": ()}
_NO_ONE: frozenset[Any] = frozenset()
# a state file as `queuefiles.encode_state` writes it while no recipient is settled
_USUAL_STATE = re.compile(
    rb'\{"attempts": (\d{1,9}), "delivered": \[\], "failed": \[\], "warned": (?:true|false)\} *'
).fullmatch
HEADER = f"{'Queue ID':<22} {'Size':>8} {'Arrived (UTC)':<19} {'Tries':>5}  Sender / Recipients"
_INDENT = " " * 59
CHUNK = 256  # messages a chunk: every other one is the forked child's
PIECE = (
    256 * 1024
)  # characters of rows a write (and a frame from the child), give or take a message
FORK_FROM = 512  # messages (two chunks): below this a fork (~1 ms) is not worth it
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
_O_NOATIME = getattr(os, "O_NOATIME", 0)  # refused (EPERM) on files of another owner
_REASONS = {
    errno.ELOOP: "a symbolic link",
    errno.EISDIR: "a directory",
    errno.ESPIPE: "not a regular file",
}


def write(spool: Path | str, out: TextIO, *, fork: bool | None = None, chunk: int = CHUNK) -> None:
    """The listing of the spool directory ``spool`` to ``out``, oldest message first, a
    chunk of rows (or a `PIECE` of them) a write. ``fork``: whether a child process formats
    half of it (by default with a long queue and more than one processor); the output is
    the same either way."""
    with _Reader(str(spool)) as reader:
        ids = queued_ids(reader.queue_path)
        if fork is None:
            fork = len(ids) >= FORK_FROM and forkmerge.processors() > 1
        count = 0
        out.flush()  # nothing buffered is written twice by a child
        results = forkmerge.ordered(ids, reader.rows, size=chunk, fork=fork)
        try:
            for payload, rows in results:
                if rows and not count:
                    out.write(HEADER + "\n")
                count += rows
                out.write(payload.decode())
        finally:
            results.close()  # the child reaped now, also when the reader went away
    out.write(f"-- {count} message(s)\n" if count else "Mail queue is empty\n")


class _Reader:
    """Reads and formats messages relative to open descriptors of ``queue/`` and ``state/``
    (no path walk from the root per file), trying each state file rather than listing
    ``state/``: in a queue of deferred messages nearly every one has one."""

    def __init__(self, root: str) -> None:
        self.queue_path = f"{root}/{QUEUE}"
        self._flags = _FLAGS | _O_NOATIME
        self._stamp = _Stamp()
        self._queue = _open_directory(self.queue_path)
        self._state = _open_directory(f"{root}/{STATE}")

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in (self._queue, self._state):
            if fd >= 0:
                os.close(fd)

    def rows(self, ids: Sequence[str]) -> Iterator[tuple[bytes, int, int]]:
        """The rows of these messages (UTF-8) in pieces of about `PIECE` characters, each
        with how many messages it lists (not gone, not being received) and how many of
        ``ids`` are done; a huge envelope's rows never wait in memory with a chunk's.

        One loop with the common case inline (a queue file whose first 4 KiB hold all of
        it, a state file in its usual form): this is the listing's cost per message."""
        parts: list[str] = []
        held = 0  # characters in parts
        flags, queue, state, stamp = self._flags, self._queue, self._state, self._stamp
        open_, pread, read, close = os.open, os.pread, os.read, os.close
        for done, queue_id in enumerate(ids):
            if held >= PIECE:
                yield "".join(parts).encode(), len(parts), done
                parts.clear()
                held = 0
            try:
                fd = open_(queue_id + SUFFIX, flags, dir_fd=queue)
                try:
                    head = pread(fd, 4096, 0)
                finally:
                    close(fd)
            except OSError:
                head = b""  # the careful path says why
            if len(head) == 4096 or (end := head.find(b"\n")) < 0:
                row = self._message(queue_id)  # long, torn, gone or not a file
                flags = self._flags  # without O_NOATIME if that was refused
            else:
                attempts = 0
                settled: AbstractSet[Any] = _NO_ONE
                try:
                    fd = open_(queue_id + ".json", flags, dir_fd=state)
                    try:
                        raw = read(fd, 4096)
                    finally:
                        close(fd)
                    if (usual := _USUAL_STATE(raw)) is not None:
                        attempts = int(usual[1])
                    else:
                        attempts, settled = _attempts_settled(self._state_of(queue_id))
                except OSError:
                    pass  # none yet (or not a file): nothing recorded
                row = _format(queue_id, len(head), head[:end], attempts, settled, stamp)
            if row is not None:
                parts.append(row)
                held += len(row)
        yield "".join(parts).encode(), len(parts), len(ids)

    def _message(self, queue_id: str) -> str | None:
        """The rows of one message read on the careful path; None when it is gone or not
        yet (or never) accepted."""
        try:
            line, size = self._head(queue_id)
        except FileNotFoundError:
            return None  # delivered while we looked
        except OSError as error:  # a link, a directory, a FIFO, a device, not ours to read
            reason = _REASONS.get(error.errno or 0) or (error.strerror or "unreadable").lower()
            attempts = _attempts_settled(self._state_of(queue_id))[0]
            return _unreadable(queue_id, "?", attempts, f": {reason}")
        attempts, settled = _attempts_settled(self._state_of(queue_id))
        return _format(queue_id, size, line, attempts, settled, self._stamp)

    def _open(self, name: str, directory: int) -> int:
        try:
            return os.open(name, self._flags, dir_fd=directory)
        except PermissionError as error:
            if error.errno != errno.EPERM or not self._flags & _O_NOATIME:
                raise
            fd = os.open(name, _FLAGS, dir_fd=directory)
            self._flags = _FLAGS  # not our files: O_NOATIME would be refused for each
            return fd

    def _head(self, queue_id: str) -> tuple[bytes, int]:
        """The queue file's first line and its size."""
        fd = self._open(queue_id + SUFFIX, self._queue)
        try:
            head = os.pread(fd, 4096, 0)
            if len(head) < 4096 and (end := head.find(b"\n")) >= 0:
                return head[:end], len(head)  # the whole file: no fstat
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise OSError(errno.ESPIPE, "not a regular file")  # /dev/zero and the like
            return envelope_line(fd)[0], status.st_size
        finally:
            os.close(fd)

    def _state_of(self, queue_id: str) -> Any:
        """The decoded state file, read whole; `_NOTHING` when there is none or it is torn."""
        try:
            fd = self._open(queue_id + ".json", self._state)
        except OSError:
            return _NOTHING
        try:
            # a small read first: os.read(fd, 1 MiB) would allocate a MiB per state file
            raw = os.read(fd, 4096)
            if len(raw) == 4096:  # many recipients settled: the rest in larger reads
                pieces, held = [raw], len(raw)
                while held < MAX_STATE and (piece := os.read(fd, 65536)):
                    pieces.append(piece)
                    held += len(piece)
                raw = b"".join(pieces)
            return _decode(raw.decode())[0]
        except (OSError, ValueError, RecursionError):  # torn, not UTF-8, not a file, "[[[..."
            return _NOTHING
        finally:
            os.close(fd)


def _open_directory(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return -1


def _attempts_settled(state: Any) -> tuple[int, AbstractSet[Any]]:
    """Attempts so far and the recipients settled, from a decoded state file."""
    try:
        attempts = int(state["attempts"])
        if state["delivered"] or state["failed"]:
            return attempts, frozenset(state["delivered"]) | frozenset(state["failed"])
    except (KeyError, TypeError, ValueError):
        return 0, _NO_ONE
    return attempts, _NO_ONE


def _format(
    queue_id: str, size: int, line: bytes, attempts: int, settled: AbstractSet[Any], stamp: _Stamp
) -> str | None:
    """The rows of one message: its envelope line decoded, the recipients not yet settled.
    None for a file whose declared length is not its size: a message still being received
    (its writer fills in the length before the fsync and the 250) or one a crash cut short
    before its 250, which the relay removes; like Postfix's showq, which lists only queue
    files their writer has marked complete."""
    try:
        envelope = _decode(line.decode())[0]
        arrived = stamp(float(envelope["received"]))
        if (length := envelope.get("length")) is not None:  # written in place (spool.Draft)
            if type(length) is not int:
                raise TypeError("the envelope's length is not a number")
            if length != size:
                return None
        sender = str(envelope["sender"]) or "<>"
        if not sender.isprintable():
            sender = _shown(sender)
        row = f"{queue_id}  {size:>8} {arrived:<19} {attempts:>5}  {sender}\n"
        for recipient in envelope["recipients"]:
            if recipient not in settled:
                row += f"{_INDENT}{_shown(str(recipient))}\n"
    except (ValueError, KeyError, TypeError, OverflowError, OSError, RecursionError):
        # not UTF-8 or not JSON, a field missing or of the wrong type, a time gmtime
        # cannot show, a megabyte of "[" (the decoder's recursion limit)
        return _unreadable(queue_id, size, attempts)
    return row


def _unreadable(queue_id: str, size: int | str, attempts: int, reason: str = "") -> str:
    return f"{queue_id:<22} {size:>8} {'?':<19} {attempts:>5}  (unreadable envelope{reason})\n"


def _shown(text: str) -> str:
    """``text`` as one printable line: control characters (a newline that would start a
    forged row, a terminal escape) and lone surrogates escaped as Python does."""
    return text if text.isprintable() else repr(text)[1:-1]


class _Stamp:
    """``YYYY-mm-dd HH:MM:SS`` of a time, computed once per second of arrival."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, seconds: float) -> str:
        second = int(seconds)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return self._text
