"""Messages one worker accepts, delivered by another: receive and delivery on two cores.

With several workers, a worker gives the messages it accepts ids in the *next* worker's
shard (spool.Shard), and every worker watches the queue directory with inotify for messages
renamed into it: the owner of a new id schedules it at once. A single busy session then
keeps two cores busy (one receives, one delivers) instead of one, as Postfix's smtpd and
smtp are separate processes; with many sessions every worker does both.

inotify's queue can overflow (``IN_Q_OVERFLOW``, after ``fs.inotify.max_queued_events``
unread events); the watcher then rescans the directory, so no message waits for the queue
timer. Where inotify is not available (no instance left under
``fs.inotify.max_user_instances``), `open_watches` returns None and each worker keeps what
it accepts, as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

from smtprelay.logs import system_log

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# A received message is written in place and closed once durable (spool.Draft); a bounce
# or an older relay's message is renamed into place.
_WATCHED = IN_CLOSE_WRITE | IN_MOVED_TO
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len octets of NUL-padded name
_READ_SIZE = 65536


def parse_events(buffer: bytes) -> tuple[list[str], bool]:
    """The names in a read of inotify events, and whether the kernel's queue overflowed.
    Pure: a short or malformed buffer yields what it holds whole."""
    names: list[str] = []
    overflow = False
    offset = 0
    while offset + _EVENT.size <= len(buffer):
        _wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
        offset += _EVENT.size
        if offset + length > len(buffer):
            break
        if mask & IN_Q_OVERFLOW:
            overflow = True
        elif length:
            raw = buffer[offset : offset + length].split(b"\0", 1)[0]
            names.append(raw.decode("utf-8", "replace"))
        offset += length
    return names, overflow


class QueueWatch:
    """inotify on the queue directory: ``arrived(name)`` for each file committed in it,
    ``overflowed()`` when events were lost."""

    def __init__(
        self,
        fd: int,
        *,
        arrived: Callable[[str], None],
        overflowed: Callable[[], None],
    ) -> None:
        self._fd = fd
        self._arrived = arrived
        self._overflowed = overflowed

    def read(self) -> None:
        """Drain the events waiting (called by the event loop when the fd is readable)."""
        while True:
            try:
                buffer = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            names, overflow = parse_events(buffer)
            for name in names:
                self._arrived(name)
            if overflow:
                self._overflowed()
            if len(buffer) < _READ_SIZE // 2:
                return

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)


def open_watches(directory: Path, count: int) -> list[int] | None:
    """One inotify descriptor on ``directory`` per worker, opened by the supervisor before
    it forks, so events queue from the start and every worker has one or none has: a
    message handed to a worker that could not watch would wait for the queue timer. None
    where inotify is unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    fds: list[int] = []
    for _ in range(count):
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(directory), _WATCHED) < 0:
            os.close(fd)
            fd = -1
        if fd < 0:
            error = os.strerror(ctypes.get_errno())
            for opened in fds:
                os.close(opened)
            system_log().warning("handoff_unavailable", error=error)
            return None
        fds.append(fd)
    return fds


def attach(
    fd: int,
    *,
    arrived: Callable[[str], None],
    overflowed: Callable[[], None],
) -> QueueWatch:
    """Read the watch's events on the running loop."""
    queue_watch = QueueWatch(fd, arrived=arrived, overflowed=overflowed)
    asyncio.get_running_loop().add_reader(fd, queue_watch.read)
    queue_watch.read()  # what arrived before this worker's loop ran
    return queue_watch
