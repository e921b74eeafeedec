"""Who may open a session: ``limits.sessions`` and ``limits.sessionsPerClient``, counted for
the whole relay, not for one worker.

Every worker accepts on the same socket, so counts kept by each worker alone would let a
limit of 10 admit 10 per worker. The counts live in one shared mapping of an anonymous
memory file, made before the workers are forked; a POSIX record lock on that file orders
the workers' updates (a per-process lock, so forked workers exclude each other, and no
``/dev/shm`` is needed). A client's count is kept in a bucket chosen by a stable hash of its
address: two clients whose addresses share a bucket share its budget, so a collision can
only refuse early, never admit beyond a limit. The limits themselves are read per
connection, so a new relay.yaml changes them without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import zlib
from collections.abc import Iterator

from smtprelay.config import Limits

SESSIONS_FULL = "421 4.3.2 Too many sessions, try again later"
CLIENT_FULL = "421 4.7.0 Too many sessions from your address, try again later"
BUCKETS = 65536  # 256 KiB of counts, touched only where clients hash to


class SessionCounts:
    """Open sessions in total and per client address, shared by the processes forked after
    it was made. Each process must ``leave`` exactly what it ``admit``-ted."""

    def __init__(self, buckets: int = BUCKETS) -> None:
        self._buckets = buckets
        size = 4 * (buckets + 1)
        self._fd = os.memfd_create("smtprelay-sessions", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        self._counts = memoryview(self._map).cast("i")  # [0]: total; [1:]: per bucket

    def _bucket(self, client: str) -> int:
        return 1 + zlib.crc32(client.encode("utf-8", "replace")) % self._buckets

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def admit(self, client: str, limits: Limits) -> str | None:
        """Count a new session of ``client`` in, or return the 421 it gets instead."""
        bucket = self._bucket(client)
        counts = self._counts
        with self._locked():
            if counts[0] >= limits.sessions:
                return SESSIONS_FULL
            if counts[bucket] >= limits.sessions_per_client:
                return CLIENT_FULL
            counts[0] += 1
            counts[bucket] += 1
        return None

    def leave(self, client: str) -> None:
        bucket = self._bucket(client)
        counts = self._counts
        with self._locked():
            counts[0] = max(0, counts[0] - 1)
            counts[bucket] = max(0, counts[bucket] - 1)

    def total(self) -> int:
        return int(self._counts[0])
