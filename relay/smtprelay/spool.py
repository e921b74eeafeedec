"""The durable queue on the volume: the only thing the relay's stages share.

Layout under the spool directory::

    queue/<id>.eml    immutable: one JSON envelope line, then the message as received
    state/<id>.json   mutable: attempts made, when the next is due, recipients settled
    corrupt/          files that are not the relay's or cannot be read, set aside
    smtprelay.pid     the serving process, so queue commands can nudge it
    smtprelay.lock    flock'ed by every process of the relay serving this spool

A message's queue file doubles as its lock (``flock``): the relay holds it through each
delivery attempt and queue commands take it before they delete, bounce or reschedule, so an
administrator never removes a message in the middle of an attempt that then delivers it.

A message exists once its ``queue/<id>.eml`` has been written with its length in its envelope
line and fsynced, and the directory fsynced; only then does the relay answer 250. A received
message is written under its final name, locked by its writer until then (`Draft`); one a
crash cut short declares a length other than its size and is removed, never delivered.
Messages the relay makes itself (bounces) are written under a temporary name and renamed.
A state file is overwritten in place and not fsynced: losing or tearing one is harmless, the
message is merely tried again (at worst sent twice).
Directory fsyncs are grouped, so concurrent messages share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from smtprelay.draft import (
    SPILL_AT,
    Draft,
    Incomplete,
    check_complete,
    write_all,
)
from smtprelay.dsn import MailOptions, RecipientOptions
from smtprelay.envelope import Envelope, decode_envelope, encode_envelope, envelope_of
from smtprelay.queuefiles import (
    LOCK_FILE,
    MAX_ENVELOPE,
    PID_FILE,
    Busy,
    NotAQueueFile,
    QueueEntry,
    QueueFiles,
    QueueState,
    SpoolInUse,
    envelope_line,
    fsync_dir,
    is_queue_id,
    oldest_age,
    open_for_reading,
)
from smtprelay.queuefiles import SUFFIX as _SUFFIX

__all__ = [  # the queue side's and the draft's names, still importable from here
    "LOCK_FILE",
    "MAX_ENVELOPE",
    "PID_FILE",
    "SPILL_AT",
    "Busy",
    "Draft",
    "Envelope",
    "Incomplete",
    "NotAQueueFile",
    "QueueEntry",
    "QueueState",
    "SpoolInUse",
    "check_complete",
    "decode_envelope",
    "encode_envelope",
    "is_queue_id",
    "oldest_age",
]


WRITER_THREADS = 32


@dataclass(frozen=True)
class MessageFile:
    """A spooled message, read in pieces: memory never follows its size.

    With ``fd`` (the descriptor `Spool.locked` holds during an attempt) it is read with
    ``pread`` and never opened again; without, each read opens ``path``.
    """

    path: Path
    offset: int
    fd: int | None = None

    def pieces(self, size: int = 65536) -> Iterator[bytes]:
        if self.fd is not None:
            position = self.offset
            while piece := os.pread(self.fd, size, position):
                position += len(piece)
                yield piece
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            while piece := handle.read(size):
                yield piece

    @property
    def size(self) -> int:
        if self.fd is not None:
            return os.fstat(self.fd).st_size - self.offset
        return self.path.stat().st_size - self.offset

    def head(self, limit: int = 65536) -> bytes:
        """The message's first ``limit`` octets (its header, for a report)."""
        if self.fd is not None:
            return os.pread(self.fd, limit, self.offset)
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            return handle.read(limit)


def new_queue_id(now: float, shard: tuple[int, int] = (0, 1)) -> str:
    """Sortable by arrival, unique without coordination: the time in milliseconds, then 40
    random bits whose last 16 fall in worker ``index`` of ``count`` (see `Shard`).

    The bits come from `random` (seeded from the OS at start and again in each forked
    worker): an id must not collide, it need not be unguessable, and ``os.urandom`` per
    message was a system call on the hot path.
    """
    index, count = shard
    bits = random.getrandbits(40)
    low = bits & 0xFFFF
    low += index - low % count
    if low > 0xFFFF:
        low -= count
    return f"{int(now * 1000):011x}{(bits & ~0xFFFF) | low:010x}"


@dataclass(frozen=True)
class Shard:
    """Which messages of a shared spool one worker process schedules.

    A queue id belongs to worker ``int(id[-4:], 16) % count``: computed, not recorded, so
    a restart with another worker count simply shares the queue out anew, and exactly one
    worker ever tries a given message.
    """

    index: int = 0
    count: int = 1

    def owns(self, queue_id: str) -> bool:
        return self.count == 1 or int(queue_id[-4:], 16) % self.count == self.index

    def new_id(self, now: float) -> str:
        """A fresh id this worker owns, so what it accepts it also delivers."""
        return new_queue_id(now, (self.index, self.count))


def _fsync_dir(path: Path) -> None:
    fsync_dir(path)  # by this name, so a test can count the group's fsyncs


def _write_durably(path: Path, chunks: list[bytes]) -> None:
    """Write to a temporary name, fsync, rename into place (the caller fsyncs the directory)."""
    tmp = path.with_name(f".tmp-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)


class _GroupSync:
    """Group commit of directory fsyncs, in the writers' own threads.

    A writer whose rename is done needs an fsync of the directory that starts after it.
    If none is running, it runs one at once (a lone message waits for no timer and makes no
    further thread hop); if one is running, it waits for the next, which the first writer
    to arrive after the running one ends starts for everyone who arrived meanwhile.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._started = 0  # fsyncs begun; they run one at a time, in order
        self._done = 0
        self._running = False
        self._failed: dict[int, OSError] = {}

    def sync(self) -> None:
        """Block until an fsync of the directory that began after this call has ended."""
        with self._cond:
            target = self._started + 1
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                number = self._started
                self._cond.release()
                error: OSError | None = None
                try:
                    _fsync_dir(self._path)
                except OSError as failure:
                    error = failure
                finally:
                    self._cond.acquire()
                self._running = False
                self._done = number
                if error is not None:
                    self._failed[number] = error
                    while len(self._failed) > 64:
                        del self._failed[min(self._failed)]
                self._cond.notify_all()
            failed = self._failed.get(target)
        if failed is not None:
            raise OSError(failed.errno, failed.strerror, str(self._path))


class Spool(QueueFiles):
    """The queue directory, with durable enqueue and crash-safe state updates."""

    def __init__(
        self, root: Path, *, clock: Callable[[], float] = time.time, shard: Shard | None = None
    ) -> None:
        super().__init__(root)
        self.shard = shard or Shard()
        # whose shard the ids of accepted messages fall in (another worker's: handoff.py)
        self.accept_shard = self.shard
        self._clock = clock
        self._listeners: list[Callable[[str], None]] = []
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._queue_sync = _GroupSync(self.queue_dir)
        self._writers: ThreadPoolExecutor | None = None

    def owns(self, queue_id: str) -> bool:
        return self.shard.owns(queue_id)

    def _store(self, path: Path, chunks: list[bytes]) -> None:
        """Write, fsync, rename and fsync the directory (grouped): one thread hop."""
        _write_durably(path, chunks)
        try:
            self._queue_sync.sync()
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def new_id(self, now: float) -> str:
        """An id for a message being accepted (see ``accept_shard``)."""
        return self.accept_shard.new_id(now)

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Be told the id of every message enqueued from now on."""
        self._listeners.append(listener)

    def free_bytes(self) -> int:
        """Space left on the spool's volume for an unprivileged writer."""
        stats = os.statvfs(self.queue_dir)
        return stats.f_bavail * stats.f_frsize

    def probe_writable(self) -> bool:
        """True when a file can be created and removed in the queue directory."""
        probe = self.queue_dir / f".probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True

    async def enqueue(
        self,
        *,
        sender: str,
        recipients: tuple[str, ...],
        data: bytes,
        client: str = "",
        queue_id: str | None = None,
        options: MailOptions | None = None,
        recipient_options: tuple[RecipientOptions, ...] = (),
    ) -> Envelope:
        """Store a message durably; when this returns, the message survives any crash."""
        now = self._clock()
        envelope = Envelope(
            id=queue_id or self.shard.new_id(now),
            sender=sender,
            recipients=recipients,
            received=now,
            client=client,
            options=options or MailOptions(),
            recipient_options=recipient_options,
        )
        path = self.queue_dir / f"{envelope.id}{_SUFFIX}"
        await asyncio.get_running_loop().run_in_executor(
            self._writer_pool(), self._store, path, [encode_envelope(envelope), data]
        )
        for listener in self._listeners:
            listener(envelope.id)
        return envelope

    def draft(
        self,
        *,
        sender: str,
        recipients: tuple[str, ...],
        client: str,
        queue_id: str,
        options: MailOptions | None = None,
        recipient_options: tuple[RecipientOptions, ...] = (),
    ) -> Draft:
        """Start receiving a message: its envelope is the file's first line."""
        envelope = Envelope(
            id=queue_id,
            sender=sender,
            recipients=recipients,
            received=self._clock(),
            client=client,
            options=options or MailOptions(),
            recipient_options=recipient_options,
        )
        return Draft(envelope, self.queue_dir / f"{queue_id}{_SUFFIX}", self._writer_pool())

    async def commit(self, draft: Draft, *, alone: bool = False, hold: bool = False) -> Envelope:
        """Make a draft durable: its length, the fsync and the grouped directory fsync, in
        one hop to a writer thread, as `enqueue` does; when this returns, the message
        survives any crash.

        ``alone``: the caller's session is the only one its event loop serves, so nothing
        else would wait while the disk does; the commit then runs on the loop itself, as
        Postfix's cleanup does in its own process. The two thread hops it saves (~0.25 ms)
        are a tenth of what one client waits for its 250 on a fast disk; on a slow one,
        only that client waits.

        The file stays open and locked until `release` (on the loop's next turn, after the
        caller's 250, unless ``hold``: then the caller calls `release` when it will)."""
        if draft.error is not None:
            raise draft.error
        loop = asyncio.get_running_loop()
        if alone and draft.small:
            self._commit_draft(draft)
        else:
            writing = loop.run_in_executor(self._writer_pool(), self._commit_draft, draft)
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                # The session went away (its task is cancelled) while a writer makes the
                # message durable. Once durable it is delivered like any other, so its
                # file must not stay locked by this process for good: let go of it when
                # the writer is done. (The client got no 250 and may send it again: the
                # duplicate RFC 1047 describes, which SMTP accepts over a loss.)
                writing.add_done_callback(functools.partial(self._settled, draft))
                raise
        if not hold:
            loop.call_soon(self.release, draft)
        return draft.envelope

    def _settled(self, draft: Draft, writing: asyncio.Future[None]) -> None:
        """A commit whose session is gone has ended: a durable message is let go."""
        if not writing.cancelled() and writing.exception() is None:
            self.release(draft)

    def release(self, draft: Draft) -> None:
        """Let go of a committed draft's file: its delivery may start."""
        draft.close()
        for listener in self._listeners:
            listener(draft.envelope.id)

    def _commit_draft(self, draft: Draft) -> None:
        """Write what waits and the length, fsync the file, then the directory (grouped
        with whatever other writers are waiting): in a writer thread, or on the loop for a
        session alone on it. The name exists since the draft's file was created, and on
        ext4 the file's fsync already commits the journal transaction that made it, so the
        directory's fsync after it is short (0.05 ms here); run alongside in a pool of its
        own it cost a thread hop and ~15% more context switches for no measurable speed."""
        try:
            draft.write_rest()
            draft.sync()
            self._queue_sync.sync()
        except OSError:
            draft.discard()
            raise

    def _writer_pool(self) -> ThreadPoolExecutor:
        if self._writers is None:
            # Writers wait in their threads for the grouped fsync: the more threads, the
            # more messages share one; threads start only as concurrent messages need them.
            self._writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="spool")
        return self._writers

    def open_message(self, queue_id: str) -> tuple[Envelope, MessageFile]:
        """The envelope, and where the message is, to be read in pieces. While `locked`
        holds the message, its descriptor serves every read of the attempt."""
        path = self.queue_dir / f"{queue_id}{_SUFFIX}"
        held = self._held.get(queue_id)
        fd = held if held is not None else open_for_reading(path)
        try:
            line, offset = envelope_line(fd)
            header = json.loads(line)
            if not isinstance(header, dict):
                raise ValueError("the envelope line is not a JSON object")
            info = os.fstat(fd)
            check_complete(header, info.st_size, time.time() - info.st_mtime)
        finally:
            if held is None:
                os.close(fd)
        return envelope_of(header), MessageFile(path, offset, held)

    def read(self, queue_id: str) -> tuple[Envelope, bytes]:
        """The envelope and the message as it was accepted."""
        with open(open_for_reading(self.queue_dir / f"{queue_id}{_SUFFIX}"), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise NotAQueueFile(f"{queue_id}{_SUFFIX} is not a regular file")
            raw = handle.read()
        line, _, data = raw.partition(b"\n")
        return decode_envelope(line), data
