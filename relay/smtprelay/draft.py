"""A message being received: gathered in memory, spilled to its queue file by writer
threads, made durable by `Spool.commit` (the file's length stamped in its envelope line)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smtprelay.envelope import Envelope, encode_envelope

SPILL_AT = 64 * 1024  # octets a draft holds in memory before a writer thread writes them
LENGTH_WIDTH = 20  # the envelope's "length" field: digits right-aligned after JSON spaces


def length_field(length: int) -> bytes:
    """The envelope line's last field, fixed in width so it can be written over in place:
    ``,"length":<spaces><digits>}`` (whitespace before a JSON value is allowed)."""
    return b',"length":' + str(length).rjust(LENGTH_WIDTH).encode() + b"}\n"


def _draft_header(envelope: Envelope) -> bytes:
    """A draft's envelope line, declaring a length of 0 until `Draft.write_rest` writes the
    file's real length over it."""
    return encode_envelope(envelope)[:-2] + length_field(0)


INCOMPLETE_GRACE = 60.0  # seconds an unlocked, incomplete file is left to its writer


class Incomplete(ValueError):
    """A queue file whose declared length is not its size: a receipt a crash cut short
    (it was never answered 250), or, while ``young``, one whose writer has created it but
    not yet locked it (a window of microseconds between its ``open`` and its ``flock``)."""

    def __init__(self, message: str, *, young: bool) -> None:
        super().__init__(message)
        self.young = young


def check_complete(header: dict[str, object], size: int, age: float) -> None:
    """Raise `Incomplete` unless a queue file of ``size`` octets, last written ``age``
    seconds ago, is whole. Files written by `Spool.enqueue` (renamed into place) and by
    older relays declare no length."""
    declared = header.get("length")
    if declared is None:
        return
    if not isinstance(declared, int) or isinstance(declared, bool):
        raise ValueError(f"envelope length is not a number: {declared!r}")
    if declared != size:
        young = age < INCOMPLETE_GRACE
        raise Incomplete(f"declares {declared} octets, holds {size}", young=young)


class Draft:
    """A message being received, made durable and visible by `Spool.commit` or thrown away
    by `discard`.

    The file is written under its final name, flock'ed by the writer from its creation
    until just after the 250 (after the session's next reply: `RelaySMTP._replied`), and
    declares its own length in the envelope line: the length is written (over a
    placeholder of 0) just before the fsync. So one journal commit makes the data, the
    declared length and the directory entry durable together (on ext4 a file's fsync
    commits the transaction that created its name; the directory's fsync after it finds
    that done), where a temporary name renamed into place took a second commit. A reader
    that takes the lock and finds the length wrong has a file a crash cut short, which
    never got a 250 (once it is `INCOMPLETE_GRACE` old: a younger one may be a writer's
    between its create and its lock); until the writer lets go, attempts find it busy.

    What arrives is gathered in memory and handed to a writer thread once ``SPILL_AT``
    octets are waiting, so a session holds at most ``SPILL_AT`` plus one read of its body,
    and the event loop never creates, writes or unlinks a file while it serves other
    sessions: on a journalling filesystem any of those can wait for a journal commit,
    stalling every session of the worker. A message smaller than ``SPILL_AT`` touches the
    disk once, in `Spool.commit`'s single thread hop (or on the loop, for a session alone
    on it: ``small``). A write that fails (a full volume) is remembered in ``error`` and
    later writes are skipped, so the session can read the rest of the message and answer
    4xx.
    """

    def __init__(self, envelope: Envelope, path: Path, writers: ThreadPoolExecutor) -> None:
        self.envelope = envelope
        self.path = path
        self.error: OSError | None = None
        self.size = 0
        header = _draft_header(envelope)
        self._length_at = len(header) - 2 - LENGTH_WIDTH  # where the digits go
        self._pending = bytearray(header)
        self._written = 0  # octets in the file
        self._stamped = False  # the real length is in the file's envelope line
        self._fd: int | None = None
        self._writers = writers
        self._lock = threading.Lock()  # a spill still running when the session is aborted
        self._discarded = False

    @property
    def small(self) -> bool:
        """Nothing written yet and all of it in memory: the commit is one short write."""
        return self._fd is None and len(self._pending) < SPILL_AT

    def add(self, data: bytes) -> None:
        """Append ``data`` in memory (the caller keeps it small; see `write`)."""
        if self.error is None and not self._discarded:
            self._pending += data
        self.size += len(data)

    async def write(self, data: bytes) -> None:
        """Append ``data``; once ``SPILL_AT`` octets wait, a writer thread writes them out."""
        self.add(data)
        if len(self._pending) >= SPILL_AT:
            await asyncio.get_running_loop().run_in_executor(self._writers, self._spill)

    def _spill(self, *, last: bool = False) -> None:
        """Write what waits to the file (in a writer thread); ``last``: the whole message
        is here, so the real length goes in before the first write if it can."""
        with self._lock:
            pending, self._pending = self._pending, bytearray()
            if self._discarded or self.error is not None:
                return
            try:
                if self._fd is None:
                    if last:
                        digits = str(len(pending)).rjust(LENGTH_WIDTH).encode()
                        pending[self._length_at : self._length_at + LENGTH_WIDTH] = digits
                        self._stamped = True
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                    # Blocking: a reader that found the file in the instant before this
                    # lets go at once (the file is young and incomplete: `check_complete`).
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                write_all(self._fd, pending)
                self._written += len(pending)
            except OSError as error:
                self.error = error
                self._remove_file()

    def write_rest(self) -> None:
        """Write what waits and the real length (in a writer thread): after this the file
        exists under its name and holds the whole message."""
        self._spill(last=True)
        with self._lock:
            if self.error is not None:
                raise self.error
            if self._discarded or self._fd is None:
                raise OSError(0, "draft discarded", str(self.path))
            if not self._stamped:  # spilled before the end: the length goes over the 0
                digits = str(self._written).rjust(LENGTH_WIDTH).encode()
                os.pwrite(self._fd, digits, self._length_at)

    def sync(self) -> None:
        """fsync the file (in a writer thread); it stays open and locked until `close`."""
        with self._lock:
            if self._fd is None:
                raise OSError(0, "draft discarded", str(self.path))
            os.fsync(self._fd)

    def close(self) -> None:
        """Let go of the committed file: readers may take it now (inotify's close-write
        event tells the worker that delivers it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def discard(self) -> None:
        """Forget the message. Only a draft that has spilled has a file to remove, and
        aborted or refused messages are rare: that unlink may run on the event loop."""
        with self._lock:
            self._discarded = True
            self._pending = bytearray()
            self._remove_file()

    def _remove_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # before the close: no reader takes an unfinished file
            os.close(self._fd)
            self._fd = None


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
