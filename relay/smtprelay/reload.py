"""Changes without a restart: relay.yaml and the gateway credentials, re-read when they change.

In a pod both are volumes the kubelet updates by swapping a ``..data`` symlink, so the
resolved file's inode and modification time change; once a second two ``stat`` calls notice.
A new relay.yaml is read, hashed (sha256 of its bytes: the operator's config hash) and
validated with the same model as at start; an invalid one is refused (``config_refused``,
the settings in force stay) and a valid one is switched to at once (``config_reloaded``).
Sessions and delivery attempts take the settings current when they begin and finish under
them: the switch replaces one reference (`Live`), nothing is mutated.

What a running process cannot change (the listen and metrics addresses, the spool, the
worker count, the TLS and AUTH file paths) is refused with ``config_needs_restart``; the
operator rolls the pod for those, so a relay never sees such a change live.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from smtprelay.config import RESTART_ONLY_FIELDS, ConfigError, RelayConfig, parse_config

T = TypeVar("T")

RESTART_ONLY = RESTART_ONLY_FIELDS
Stamp = tuple[tuple[int, int, int], ...]


class Live(Generic[T]):
    """The one holder of current settings: read once per unit of work, replaced whole."""

    def __init__(self, value: T) -> None:
        self._value = value

    def current(self) -> T:
        return self._value

    def swap(self, value: T) -> None:
        self._value = value


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A validated relay.yaml and the hash of its bytes."""

    config: RelayConfig
    hash: str


Source = tuple[Path, Loaded, Mapping[str, Any]]
"""Where the settings came from: the file, what was read from it, command-line overrides."""


def config_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(path: Path, overrides: Mapping[str, Any] | None = None) -> Loaded:
    """Read, hash and validate relay.yaml; ConfigError names every problem.

    ``overrides`` (top-level keys, from the command line) replace the file's values; the
    hash stays that of the file's bytes.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError([f"{path}: {error.strerror}"]) from None
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {error}"]) from None
    if overrides and isinstance(document, dict):
        document = {**document, **overrides}
    return Loaded(parse_config(document), config_hash(data))


def restart_only_changes(old: RelayConfig, new: RelayConfig) -> list[str]:
    """The fields that differ and that only a restart can change."""
    return [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]


def stamp(paths: list[Path]) -> Stamp:
    """Identity and modification time of each file (following symlinks); missing ones 0."""
    stamps = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
            continue
        stamps.append((status.st_ino, status.st_mtime_ns, status.st_size))
    return tuple(stamps)


@dataclasses.dataclass(frozen=True)
class Refused:
    """A relay.yaml that was not switched to, and why."""

    hash: str
    problems: tuple[str, ...]
    at: float


class ConfigWatcher:
    """Polls relay.yaml (and the files that go with it) and switches to a valid new version.

    ``on_config(loaded)`` is called with every relay.yaml switched to; ``on_files()`` when
    only the companion files (gateway credentials) changed. ``refused`` holds the last
    version that was not switched to, until a later one is.
    """

    def __init__(
        self,
        path: Path,
        loaded: Loaded,
        *,
        overrides: Mapping[str, Any] | None = None,
        on_config: Callable[[Loaded], None],
        on_refused: Callable[[Refused], None],
        companions: Callable[[RelayConfig], list[Path]] = lambda config: [],
        on_files: Callable[[], None] = lambda: None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._overrides = dict(overrides or {})
        self.loaded = loaded
        self.loaded_at = clock()
        self.refused: Refused | None = None
        self._on_config = on_config
        self._on_refused = on_refused
        self._companions = companions
        self._on_files = on_files
        self._interval = interval
        self._clock = clock
        self._stamp: Stamp = ()  # the first look re-reads: the file may have changed since
        self._files = stamp(companions(loaded.config))

    def check(self) -> None:
        """One look: switch to a changed relay.yaml, or report changed companion files."""
        now = stamp([self._path])
        if now != self._stamp:
            self._stamp = now
            self._reload()
        files = stamp(self._companions(self.loaded.config))
        if files != self._files:
            self._files = files
            self._on_files()

    def _reload(self) -> None:
        try:
            candidate = load(self._path, self._overrides)
        except ConfigError as error:
            data = b""
            with contextlib.suppress(OSError):
                data = self._path.read_bytes()
            self._refuse(config_hash(data), error.problems)
            return
        if candidate.hash == self.loaded.hash:
            self.refused = None
            return
        restart = restart_only_changes(self.loaded.config, candidate.config)
        if restart:
            self._refuse(
                candidate.hash,
                [f"{name}: changes only with a restart" for name in restart],
            )
            return
        self.loaded, self.loaded_at, self.refused = candidate, self._clock(), None
        self._files = stamp(self._companions(candidate.config))
        self._on_config(candidate)

    def _refuse(self, digest: str, problems: list[str]) -> None:
        if self.refused is not None and self.refused.hash == digest:
            return  # reported once per version, not once a second
        self.refused = Refused(digest, tuple(problems), self._clock())
        self._on_refused(self.refused)

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            self.check()
