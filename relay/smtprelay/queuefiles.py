"""The queue's files as the queue side uses them: listings, due times, state files, the
per-message lock, removal and setting aside.

Layout and contracts: see spool.py; names and limits on disk are queuelayout.py's (all
``smtprelay queue list`` imports). This module is what a start-up scan, the queue commands
and the scheduler's bookkeeping need, and imports nothing heavier than ``json``: no
asyncio, no threads, no envelope decoder. Receiving a message (draft, enqueue, commit) and
reading its envelope are spool.py's.

Every listing here holds one directory entry at a time (``os.scandir``), so memory does not
follow the queue's length; what the scheduler keeps per message is its index (schedule.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from smtprelay.queuelayout import (
    CORRUPT,
    MAX_ENVELOPE,
    MAX_STATE,
    QUEUE,
    STATE,
    SUFFIX,
    envelope_line,
    is_queue_file,
    is_queue_id,
    queued_ids,
)

if TYPE_CHECKING:
    from smtprelay.spool import Envelope

__all__ = [  # the layout's names, still importable from here
    "MAX_ENVELOPE",
    "MAX_STATE",
    "QUEUE",
    "STATE",
    "SUFFIX",
    "envelope_line",
    "is_queue_id",
]

PID_FILE = "smtprelay.pid"
LOCK_FILE = "smtprelay.lock"


@dataclass(frozen=True)
class QueueState:
    """How far delivery of one message has come."""

    attempts: int = 0
    delivered: frozenset[str] = field(default_factory=frozenset)
    failed: frozenset[str] = field(default_factory=frozenset)
    warned: bool = False  # the sender has had the delivery.delayWarning notice

    def pending(self, envelope: Envelope) -> tuple[str, ...]:
        settled = self.delivered | self.failed
        return tuple(r for r in envelope.recipients if r not in settled)


@dataclass(frozen=True)
class QueueEntry:
    """What a scan of the spool yields for one message, without reading any file."""

    id: str
    due: float


def oldest_age(oldest: str | None, now: float) -> float:
    """Seconds since the message with queue id ``oldest`` arrived (0 for none): the id
    begins with its arrival time."""
    return 0.0 if oldest is None else max(0.0, now - int(oldest[:11], 16) / 1000)


def _overwrite(path: str, data: bytes) -> None:
    """Write ``data`` over the start of the file at ``path`` (created if missing), padding
    with spaces to the file's old length instead of truncating it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAQueueFile(f"{path} is not a regular file")
        if (size := info.st_size) > len(data):
            data += b" " * (size - len(data))
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
    finally:
        os.close(fd)


def open_for_reading(path: str | Path) -> int:
    """A read-only descriptor that leaves the access time alone: on a ``relatime`` mount
    the first read of a new file would otherwise dirty its inode, a journal write per
    delivered message. ``O_NOATIME`` is refused (EPERM) on files of another owner.

    A file on the volume may be hostile: a symlink is not followed (`NotAQueueFile`), and
    a FIFO does not block the open (``O_NONBLOCK``; callers check what they opened)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        try:
            return os.open(path, flags | _O_NOATIME)
        except PermissionError:
            return os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotAQueueFile(f"{path} is a symbolic link") from None
        raise


class NotAQueueFile(OSError):
    """A name in the spool that is not a regular file (a symlink, a FIFO, a directory):
    never read through, never written through; set aside for an administrator."""


_O_NOATIME = getattr(os, "O_NOATIME", 0)


def encode_state(state: QueueState) -> bytes:
    return json.dumps(
        {
            "attempts": state.attempts,
            "delivered": sorted(state.delivered),
            "failed": sorted(state.failed),
            "warned": state.warned,
        }
    ).encode()


def decode_state(raw: bytes) -> QueueState:
    data = json.loads(raw)
    return QueueState(
        attempts=int(data["attempts"]),
        delivered=frozenset(data["delivered"]),
        failed=frozenset(data["failed"]),
        warned=bool(data.get("warned", False)),  # absent in state files of older relays
    )


class SpoolInUse(Exception):
    """Another relay's processes still serve this spool."""


class Busy(Exception):
    """Someone else (the relay mid-attempt, or a queue command) holds the message."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class QueueFiles:
    """The spool directory's ``queue/`` and ``state/`` as the queue side uses them;
    `spool.Spool` adds receiving messages and reading their envelopes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.queue_dir = root / QUEUE
        self.state_dir = root / STATE
        self.queue_path = self._queue_path = str(self.queue_dir)  # no pathlib per message
        self._state_path = str(self.state_dir)
        self._census: tuple[float, tuple[int, str | None]] | None = None  # (until, census)
        self._held: dict[str, int] = {}  # queue id -> the descriptor `locked` holds

    def owns(self, queue_id: str) -> bool:
        """Whether this process schedules ``queue_id`` (every one, unless sharded)."""
        return True

    def names(self) -> Iterator[str]:
        """Every queued message id, in directory order: one listing, nothing kept."""
        try:
            listing = os.scandir(self.queue_dir)
        except FileNotFoundError:
            return  # a spool no relay has used yet
        with listing:
            for entry in listing:
                if is_queue_file(name := entry.name):
                    yield name[: -len(SUFFIX)]

    def ids(self) -> list[str]:
        """Every queued message id, in arrival order."""
        return queued_ids(self.queue_path)

    def census(self) -> tuple[int, str | None]:
        """How many messages are queued, and the oldest one's id (ids sort by arrival)."""
        count, oldest = 0, None
        for queue_id in self.names():
            count += 1
            if oldest is None or queue_id < oldest:
                oldest = queue_id
        return count, oldest

    def recent_census(self, share: float = 0.05) -> tuple[int, str | None]:
        """`census`, taken again only once the last one is ``1/share`` times its own cost
        old: a gauge scraped however often costs at most ``share`` of a core, whatever the
        queue's length (a few milliseconds stale for a short queue, seconds for 100,000)."""
        now = time.monotonic()
        if self._census is None or now >= self._census[0]:
            result = self.census()
            self._census = (now + (time.monotonic() - now) / share, result)
        return self._census[1]

    def scan(self) -> Iterator[QueueEntry]:
        """Every queued message of this shard and when it is next due, in directory order.

        The due time is the message file's mtime (as in Postfix's deferred queue): a start
        reads directory entries only, never file contents, however long the queue, and
        holds one entry at a time.
        """
        with os.scandir(self.queue_dir) as listing:
            for entry in listing:
                if not is_queue_file(name := entry.name):
                    continue  # a temporary file, or a stray one remove_orphans sets aside
                if not self.owns(name[: -len(SUFFIX)]):
                    continue  # another worker's
                try:
                    due = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue  # delivered or removed while we looked
                yield QueueEntry(id=name[: -len(SUFFIX)], due=due)

    def due(self, queue_id: str) -> float:
        """When the message is next due (its file's mtime)."""
        return (self.queue_dir / f"{queue_id}{SUFFIX}").stat().st_mtime

    def defer(self, queue_id: str, state: QueueState, due: float) -> None:
        """Record an attempt's progress and when the next one is due."""
        self.save_state(queue_id, state)
        self.set_due(queue_id, due)

    def set_due(self, queue_id: str, due: float) -> None:
        os.utime(f"{self._queue_path}/{queue_id}{SUFFIX}", (due, due))

    def contains(self, queue_id: str) -> bool:
        held = self._held.get(queue_id)
        if held is not None:  # `locked` holds it: no path lookup
            return os.fstat(held).st_nlink > 0
        return os.path.exists(f"{self._queue_path}/{queue_id}{SUFFIX}")

    def load_state(self, queue_id: str) -> QueueState:
        """The saved state; a missing or torn state file means nothing was recorded yet."""
        try:
            return decode_state(self.state_bytes(queue_id))
        except (OSError, ValueError, KeyError, TypeError):
            return QueueState()

    def state_bytes(self, queue_id: str) -> bytes:
        """The state file as it is (up to `MAX_STATE` octets); OSError when there is none."""
        fd = open_for_reading(f"{self._state_path}/{queue_id}.json")  # rewritten often
        try:
            # a small read first: os.read(fd, 1 MiB) would allocate (and fault in) a MiB
            # for every state file, ~80 us each
            raw = piece = os.read(fd, 4096)
            while len(piece) == 4096 and len(raw) < MAX_STATE:  # many recipients settled
                piece = os.read(fd, 4096)
                raw += piece
            return raw
        finally:
            os.close(fd)

    def save_state(self, queue_id: str, state: QueueState) -> None:
        """Overwrite the state file in place, without an fsync: losing or tearing it in a
        crash of the machine only means a recipient may get the message again (as Postfix
        marks delivered recipients in its queue file without an fsync). A temporary file
        renamed over the old one would cost ~0.6 ms of CPU per deferral here (ext4 starts
        writing the new file's data at such a rename) and an fsync would bound a queue run
        by the disk's flush rate; a state only grows (more attempts, more recipients
        settled), and a shorter one is padded with JSON whitespace, so a reader sees the old
        or the new state, never the new one followed by the old one's tail."""
        _overwrite(f"{self._state_path}/{queue_id}.json", encode_state(state))

    def reschedule(self, queue_id: str, due: float) -> None:
        """Make a message due at ``due`` (used by ``queue flush``)."""
        self.set_due(queue_id, due)

    @property
    def corrupt_dir(self) -> Path:
        return self.root / CORRUPT

    def corrupt_count(self) -> int:
        """Files set aside in ``corrupt/`` (a gauge: an administrator should look)."""
        try:
            with os.scandir(self.corrupt_dir) as listing:
                return sum(1 for _ in listing)
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def locked(self, queue_id: str, *, timeout: float = 0.0) -> Iterator[bool]:
        """Hold ``queue_id`` exclusively; yields False when the message is gone (delivered
        or removed meanwhile). Waits up to ``timeout`` seconds for another holder, then
        raises `Busy`."""
        try:
            fd = open_for_reading(f"{self._queue_path}/{queue_id}{SUFFIX}")
        except FileNotFoundError:
            yield False
            return
        held = False
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Busy(queue_id) from None
                    time.sleep(0.05)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotAQueueFile(f"{queue_id}{SUFFIX} is not a regular file")
            self._held[queue_id] = fd
            held = True
            yield info.st_nlink > 0  # removed between our open and our lock
        finally:
            if not held or self._held.pop(queue_id, None) is not None:
                os.close(fd)  # unless remove(release=True) closed it already

    def remove(self, queue_id: str, *, durable: bool = False, release: bool = False) -> bool:
        """Drop a message and its state; False if it was already gone.

        After a delivery no fsync is needed: if a crash undoes the unlink, the message is
        merely delivered again, which the relay's contract allows, and an fsync per
        delivered message would cost throughput. An administrator's delete or bounce is
        ``durable``: a deleted message must not come back and be sent. With ``release``
        the lock `locked` holds on it is closed here too: the close frees the unlinked
        file, work that belongs in the caller's thread, not on the event loop.
        """
        try:
            try:
                os.unlink(f"{self._queue_path}/{queue_id}{SUFFIX}")
            except FileNotFoundError:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._state_path}/{queue_id}.json")
            if durable:
                fsync_dir(self.queue_dir)
            return True
        finally:
            if release and (fd := self._held.pop(queue_id, None)) is not None:
                os.close(fd)

    def quarantine(self, queue_id: str) -> Path:
        """Set an unreadable message aside in ``corrupt/`` (kept for an administrator, never
        tried again); returns where it went."""
        return self._set_aside(self.queue_dir / f"{queue_id}{SUFFIX}", remove_state=queue_id)

    def _set_aside(self, path: Path, *, remove_state: str = "") -> Path:
        self.corrupt_dir.mkdir(exist_ok=True)
        target = self.corrupt_dir / path.name
        if target.exists():
            target = target.with_name(f"{path.name}.{os.urandom(4).hex()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
        if remove_state:
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / f"{remove_state}.json").unlink()
        return target

    def lock_exclusively(self) -> int:
        """Take the spool for this relay: returns the locked descriptor, which worker
        processes inherit, so the lock holds while any of them lives. Raises `SpoolInUse`
        when another relay's processes hold it."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolInUse(
                f"{self.root} is in use by another relay's processes; stop them first"
            ) from None
        return fd

    def remove_orphans(self) -> int:
        """Delete temporary files and state files left by a crash, and set aside files that
        are not the relay's (``backup.eml``, an editor's leftover); returns how many."""
        removed = 0
        for directory in (self.queue_dir, self.state_dir):
            for entry in os.scandir(directory):
                if entry.name.startswith(".tmp-"):
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        for entry in os.scandir(self.queue_dir):
            name = entry.name
            if name.startswith((".tmp-", ".probe-")):
                continue
            if not is_queue_file(name):
                self._set_aside(Path(entry.path))
                removed += 1
        for entry in os.scandir(self.state_dir):
            qid = entry.name.removesuffix(".json")
            if not self.contains(qid):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed
