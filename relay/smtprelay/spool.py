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

A message exists once its ``queue/<id>.eml`` has been written, fsynced, renamed into place and
the directory fsynced; only then does the relay answer 250. A state file is overwritten in
place and not fsynced: losing or tearing one is harmless, the message is merely tried again
(at worst sent twice).
Directory fsyncs are grouped, so concurrent messages share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from smtprelay.dsn import MailOptions, RecipientOptions

_QUEUE = "queue"
_STATE = "state"
_CORRUPT = "corrupt"
_SUFFIX = ".eml"
PID_FILE = "smtprelay.pid"
LOCK_FILE = "smtprelay.lock"
MAX_ENVELOPE = 1024 * 1024  # 1000 recipients of 256 octets, with room
_ID = re.compile(r"^[0-9a-f]{21}$")  # new_queue_id's shape; anything else is not ours


def is_queue_id(name: str) -> bool:
    return _ID.match(name) is not None


class SpoolInUse(Exception):
    """Another relay's processes still serve this spool."""


WRITER_THREADS = 32


class Busy(Exception):
    """Someone else (the relay mid-attempt, or a queue command) holds the message."""


@dataclass(frozen=True)
class Envelope:
    """Who a message is from and for, fixed at acceptance."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    received: float
    client: str = ""
    options: MailOptions = field(default_factory=MailOptions)
    # NOTIFY/ORCPT per recipient, in the order of recipients; () when no RCPT carried any.
    recipient_options: tuple[RecipientOptions, ...] = ()

    def options_of(self, recipient: str) -> RecipientOptions:
        if self.recipient_options:
            for address, options in zip(self.recipients, self.recipient_options, strict=True):
                if address == recipient:
                    return options
        return RecipientOptions()


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


def _open_for_reading(path: str | Path) -> int:
    """A read-only descriptor that leaves the access time alone: on a ``relatime`` mount
    the first read of a new file would otherwise dirty its inode, a journal write per
    delivered message. ``O_NOATIME`` is refused (EPERM) on files of another owner."""
    try:
        return os.open(path, os.O_RDONLY | _O_NOATIME)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


_O_NOATIME = getattr(os, "O_NOATIME", 0)


def _read_envelope_line(fd: int) -> bytes:
    """The queue file's first line (its envelope), read with ``pread`` from the start."""
    head = os.pread(fd, 4096, 0)
    while b"\n" not in head and len(head) < MAX_ENVELOPE:  # an envelope of many recipients
        more = os.pread(fd, 65536, len(head))
        if not more:
            break
        head += more
    return head.partition(b"\n")[0]


@dataclass(frozen=True)
class QueueEntry:
    """What a scan of the spool yields for one message, without reading any file."""

    id: str
    due: float


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


def oldest_age(oldest: str | None, now: float) -> float:
    """Seconds since the message with queue id ``oldest`` arrived (0 for none): the id
    begins with its arrival time."""
    return 0.0 if oldest is None else max(0.0, now - int(oldest[:11], 16) / 1000)


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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, chunks: list[bytes]) -> None:
    """Write to a temporary name, fsync, rename into place (the caller fsyncs the directory)."""
    tmp = path.with_name(f".tmp-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        for chunk in chunks:
            _write_all(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)


def _overwrite(path: str, data: bytes) -> None:
    """Write ``data`` over the start of the file at ``path`` (created if missing), padding
    with spaces to the file's old length instead of truncating it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        if (size := os.fstat(fd).st_size) > len(data):
            data += b" " * (size - len(data))
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
    finally:
        os.close(fd)


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


def _encode_envelope(envelope: Envelope) -> bytes:
    header = {
        "id": envelope.id,
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "received": envelope.received,
        "client": envelope.client,
    }
    # Written only when present, so envelopes stay what older relays wrote and read.
    if options := envelope.options.to_json():
        header["options"] = options
    if envelope.recipient_options:
        header["recipient_options"] = [o.to_json() for o in envelope.recipient_options]
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


def _decode_envelope(line: bytes) -> Envelope:
    header = json.loads(line)
    return Envelope(
        id=header["id"],
        sender=header["sender"],
        recipients=tuple(header["recipients"]),
        received=header["received"],
        client=header.get("client", ""),
        options=MailOptions.from_json(header.get("options")),
        recipient_options=tuple(
            RecipientOptions.from_json(o) for o in header.get("recipient_options", ())
        ),
    )


def _encode_state(state: QueueState) -> bytes:
    return json.dumps(
        {
            "attempts": state.attempts,
            "delivered": sorted(state.delivered),
            "failed": sorted(state.failed),
            "warned": state.warned,
        }
    ).encode()


def _decode_state(raw: bytes) -> QueueState:
    data = json.loads(raw)
    return QueueState(
        attempts=int(data["attempts"]),
        delivered=frozenset(data["delivered"]),
        failed=frozenset(data["failed"]),
        warned=bool(data.get("warned", False)),  # absent in state files of older relays
    )


SPILL_AT = 64 * 1024  # octets a draft holds in memory before a writer thread writes them


class Draft:
    """A message being received, made durable and visible by `Spool.commit` or thrown away
    by `discard`.

    What arrives is gathered in memory and handed to a writer thread once ``SPILL_AT``
    octets are waiting, so a session holds at most ``SPILL_AT`` plus one read of its body,
    and the event loop never creates, writes or unlinks a file: on a journalling filesystem
    any of those can wait for a journal commit, stalling every session of the worker. A
    message smaller than ``SPILL_AT`` touches the disk once, in `Spool.commit`'s single
    thread hop. A write that fails (a full volume) is remembered in ``error`` and later
    writes are skipped, so the session can read the rest of the message and answer 4xx.
    """

    def __init__(self, envelope: Envelope, path: Path, writers: ThreadPoolExecutor) -> None:
        self.envelope = envelope
        self.path = path
        self.tmp = path.with_name(f".tmp-{path.name}")
        self.error: OSError | None = None
        self.size = 0
        self._pending = bytearray()
        self._fd: int | None = None
        self._writers = writers
        self._lock = threading.Lock()  # a spill still running when the session is aborted
        self._discarded = False

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

    def _spill(self) -> None:
        """Write what waits to the temporary file (in a writer thread)."""
        with self._lock:
            pending, self._pending = self._pending, bytearray()
            if self._discarded or self.error is not None:
                return
            try:
                if self._fd is None:
                    self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                _write_all(self._fd, pending)
            except OSError as error:
                self.error = error
                self._remove_file()

    def finish(self) -> None:
        """Write the rest, fsync and rename into place (in a writer thread)."""
        self._spill()
        with self._lock:
            if self.error is not None:
                raise self.error
            if self._discarded or self._fd is None:
                raise OSError(0, "draft discarded", str(self.tmp))
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Forget the message. Only a draft that has spilled has a file to remove, and
        aborted or refused messages are rare: that unlink may run on the event loop."""
        with self._lock:
            self._discarded = True
            self._pending = bytearray()
            self._remove_file()

    def _remove_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Spool:
    """The queue directory, with durable enqueue and crash-safe state updates."""

    def __init__(
        self, root: Path, *, clock: Callable[[], float] = time.time, shard: Shard | None = None
    ) -> None:
        self.root = root
        self.shard = shard or Shard()
        # whose shard the ids of accepted messages fall in (another worker's: handoff.py)
        self.accept_shard = self.shard
        self.queue_dir = root / _QUEUE
        self.state_dir = root / _STATE
        self._clock = clock
        self._listeners: list[Callable[[str], None]] = []
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._queue_sync = _GroupSync(self.queue_dir)
        self._writers: ThreadPoolExecutor | None = None
        self._held: dict[str, int] = {}  # queue id -> the descriptor `locked` holds
        self._queue_path = str(self.queue_dir)  # str paths: no pathlib cost per message
        self._state_path = str(self.state_dir)
        self._census: tuple[float, tuple[int, str | None]] | None = None  # (until, census)

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
            self._writer_pool(), self._store, path, [_encode_envelope(envelope), data]
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
        draft = Draft(envelope, self.queue_dir / f"{queue_id}{_SUFFIX}", self._writer_pool())
        draft.add(_encode_envelope(envelope))
        return draft

    async def commit(self, draft: Draft) -> Envelope:
        """Make a draft durable: fsync, rename and the grouped directory fsync, in one hop to
        a writer thread, as `enqueue` does; when this returns, the message survives any
        crash."""
        if draft.error is not None:
            raise draft.error
        await asyncio.get_running_loop().run_in_executor(
            self._writer_pool(), self._commit_draft, draft
        )
        for listener in self._listeners:
            listener(draft.envelope.id)
        return draft.envelope

    def _commit_draft(self, draft: Draft) -> None:
        try:
            draft.finish()
        except OSError:
            draft.discard()
            raise
        try:
            self._queue_sync.sync()
        except OSError:
            with contextlib.suppress(OSError):
                draft.path.unlink()
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
        fd = held if held is not None else _open_for_reading(path)
        try:
            line = _read_envelope_line(fd)
        finally:
            if held is None:
                os.close(fd)
        envelope = _decode_envelope(line)
        return envelope, MessageFile(path, len(line) + 1, held)

    def names(self) -> Iterator[str]:
        """Every queued message id, in directory order: one listing, nothing kept."""
        with os.scandir(self.queue_dir) as listing:
            for entry in listing:
                name = entry.name
                if name.endswith(_SUFFIX) and is_queue_id(name[: -len(_SUFFIX)]):
                    yield name[: -len(_SUFFIX)]

    def ids(self) -> list[str]:
        """Every queued message id, in arrival order."""
        return sorted(self.names())

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
                name = entry.name
                if not name.endswith(_SUFFIX) or not is_queue_id(name[: -len(_SUFFIX)]):
                    continue  # a temporary file, or a stray one remove_orphans sets aside
                if not self.shard.owns(name[: -len(_SUFFIX)]):
                    continue  # another worker's
                try:
                    due = entry.stat().st_mtime
                except FileNotFoundError:
                    continue  # delivered or removed while we looked
                yield QueueEntry(id=name[: -len(_SUFFIX)], due=due)

    def due(self, queue_id: str) -> float:
        """When the message is next due (its file's mtime)."""
        return (self.queue_dir / f"{queue_id}{_SUFFIX}").stat().st_mtime

    def defer(self, queue_id: str, state: QueueState, due: float) -> None:
        """Record an attempt's progress and when the next one is due."""
        self.save_state(queue_id, state)
        self.set_due(queue_id, due)

    def set_due(self, queue_id: str, due: float) -> None:
        os.utime(self.queue_dir / f"{queue_id}{_SUFFIX}", (due, due))

    def contains(self, queue_id: str) -> bool:
        held = self._held.get(queue_id)
        if held is not None:  # `locked` holds it: no path lookup
            return os.fstat(held).st_nlink > 0
        return (self.queue_dir / f"{queue_id}{_SUFFIX}").exists()

    def read(self, queue_id: str) -> tuple[Envelope, bytes]:
        """The envelope and the message as it was accepted."""
        raw = (self.queue_dir / f"{queue_id}{_SUFFIX}").read_bytes()
        line, _, data = raw.partition(b"\n")
        return _decode_envelope(line), data

    def peek(self, queue_id: str) -> tuple[Envelope, int]:
        """The envelope and the queue file's size, reading only the file's head."""
        fd = os.open(f"{self._queue_path}/{queue_id}{_SUFFIX}", os.O_RDONLY)
        try:
            head = os.read(fd, 4096)
            while b"\n" not in head:  # an envelope of many recipients
                more = os.read(fd, 65536)
                if not more:
                    break
                head += more
            return _decode_envelope(head.partition(b"\n")[0]), os.fstat(fd).st_size
        finally:
            os.close(fd)

    def state_ids(self) -> set[str]:
        """Ids of the messages that have a state file."""
        with os.scandir(self.state_dir) as listing:
            return {entry.name[:-5] for entry in listing if entry.name.endswith(".json")}

    def read_envelope(self, queue_id: str) -> Envelope:
        with (self.queue_dir / f"{queue_id}{_SUFFIX}").open("rb") as handle:
            return _decode_envelope(handle.readline())

    def load_state(self, queue_id: str) -> QueueState:
        """The saved state; a missing or torn state file means nothing was recorded yet."""
        try:
            fd = os.open(f"{self._state_path}/{queue_id}.json", os.O_RDONLY)
            try:
                raw = os.read(fd, 1 << 20)
            finally:
                os.close(fd)
            return _decode_state(raw)
        except (OSError, ValueError, KeyError):
            return QueueState()

    def save_state(self, queue_id: str, state: QueueState) -> None:
        """Overwrite the state file in place, without an fsync: losing or tearing it in a
        crash of the machine only means a recipient may get the message again (as Postfix
        marks delivered recipients in its queue file without an fsync). A temporary file
        renamed over the old one would cost ~0.6 ms of CPU per deferral here (ext4 starts
        writing the new file's data at such a rename) and an fsync would bound a queue run
        by the disk's flush rate; a state only grows (more attempts, more recipients
        settled), and a shorter one is padded with JSON whitespace, so a reader sees the old
        or the new state, never the new one followed by the old one's tail."""
        _overwrite(f"{self._state_path}/{queue_id}.json", _encode_state(state))

    def reschedule(self, queue_id: str, due: float) -> None:
        """Make a message due at ``due`` (used by ``queue flush``)."""
        self.set_due(queue_id, due)

    @contextlib.contextmanager
    def locked(self, queue_id: str, *, timeout: float = 0.0) -> Iterator[bool]:
        """Hold ``queue_id`` exclusively; yields False when the message is gone (delivered
        or removed meanwhile). Waits up to ``timeout`` seconds for another holder, then
        raises `Busy`."""
        try:
            fd = _open_for_reading(f"{self._queue_path}/{queue_id}{_SUFFIX}")
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
            self._held[queue_id] = fd
            held = True
            yield os.fstat(fd).st_nlink > 0  # removed between our open and our lock
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
                os.unlink(f"{self._queue_path}/{queue_id}{_SUFFIX}")
            except FileNotFoundError:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._state_path}/{queue_id}.json")
            if durable:
                _fsync_dir(self.queue_dir)
            return True
        finally:
            if release and (fd := self._held.pop(queue_id, None)) is not None:
                os.close(fd)

    @property
    def corrupt_dir(self) -> Path:
        return self.root / _CORRUPT

    def quarantine(self, queue_id: str) -> Path:
        """Set an unreadable message aside in ``corrupt/`` (kept for an administrator, never
        tried again); returns where it went."""
        return self._set_aside(self.queue_dir / f"{queue_id}{_SUFFIX}", remove_state=queue_id)

    def _set_aside(self, path: Path, *, remove_state: str = "") -> Path:
        self.corrupt_dir.mkdir(exist_ok=True)
        target = self.corrupt_dir / path.name
        if target.exists():
            target = target.with_name(f"{path.name}.{secrets.token_hex(4)}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
        if remove_state:
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / f"{remove_state}.json").unlink()
        return target

    def corrupt_count(self) -> int:
        """Files set aside in ``corrupt/`` (a gauge: an administrator should look)."""
        try:
            with os.scandir(self.corrupt_dir) as listing:
                return sum(1 for _ in listing)
        except FileNotFoundError:
            return 0

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
            if not (name.endswith(_SUFFIX) and is_queue_id(name[: -len(_SUFFIX)])):
                self._set_aside(Path(entry.path))
                removed += 1
        for entry in os.scandir(self.state_dir):
            qid = entry.name.removesuffix(".json")
            if not self.contains(qid):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed
