"""The certificate STARTTLS offers, re-read when cert-manager (or anyone) renews it.

A ``kubernetes.io/tls`` Secret volume is updated by swapping a symlink, so the files' inode and
modification time change. Each new connection asks for the context; at most once a second
that costs two ``stat`` calls, and a change loads a fresh ``SSLContext`` for the connections
that follow (sessions already under TLS keep theirs). A broken pair (a key that does not match,
a half-written file) keeps the previous context and is reported.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

Stamp = tuple[tuple[int, int, int], ...]


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class ReloadingContext:
    """``current()`` is the SSLContext for the certificate files as they are now."""

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        on_reload: Callable[[str | None], None] | None = None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._files = (cert_file, key_file)
        self._on_reload = on_reload
        self._interval = interval
        self._clock = clock
        self._stamp = self._stat()
        self._context = server_context(cert_file, key_file)  # a bad pair at start is fatal
        self._checked = clock()
        self._broken: Stamp | None = None
        self.reloads = 0

    def _stat(self) -> Stamp:
        stamps = []
        for path in self._files:
            status = os.stat(path)
            stamps.append((status.st_ino, status.st_mtime_ns, status.st_size))
        return tuple(stamps)

    def current(self) -> ssl.SSLContext:
        now = self._clock()
        if now - self._checked < self._interval:
            return self._context
        self._checked = now
        stamp: Stamp | None = None
        try:
            stamp = self._stat()
            if stamp in (self._stamp, self._broken):
                return self._context
            context = server_context(*self._files)
        except (OSError, ssl.SSLError) as error:
            self._broken = stamp  # reported once per broken version, not once a second
            if self._on_reload is not None:
                self._on_reload(f"{self._files[0]}: {error}")
            return self._context
        self._stamp, self._context = stamp, context
        self.reloads += 1
        if self._on_reload is not None:
            self._on_reload(None)
        return context
