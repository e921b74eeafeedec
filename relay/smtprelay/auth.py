"""SMTP AUTH users: scrypt password hashes, a users file that follows its Secret, a limiter.

A hash is written ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<key>`` with salt (16 bytes) and
key (32 bytes) in standard base64 without padding; ``smtprelay hash-password`` makes one.
``auth.usersFile`` is a YAML map of user name to such a hash. The file is a mounted Secret, so
it is re-read when it changes, and a password is checked in a worker thread (scrypt is meant
to be slow) with at most two checks at a time, so a burst of AUTH cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

SCHEME = "scrypt"
LOG2_N = 14  # N = 16384, r = 8: 16 MiB and some tens of milliseconds per check
BLOCK_SIZE = 8
PARALLELISM = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_HASH = re.compile(
    r"^\$scrypt\$ln=(?P<ln>[0-9]{1,2}),r=(?P<r>[0-9]{1,2}),p=(?P<p>[0-9]{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<key>[A-Za-z0-9+/]+)$"
)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=2**ln, r=r, p=p, maxmem=256 * 1024**2, dklen=_KEY_BYTES
    )


def hash_password(password: str, *, ln: int = LOG2_N) -> str:
    """A new hash of ``password`` with a random salt, for ``auth.usersFile``."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password.encode(), salt, ln, BLOCK_SIZE, PARALLELISM)
    return f"$scrypt$ln={ln},r={BLOCK_SIZE},p={PARALLELISM}${_b64(salt)}${_b64(key)}"


def verify_password(password: str | bytes, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; a malformed hash never matches."""
    match = _HASH.match(encoded)
    if match is None:
        return False
    ln, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
    if not (1 <= ln <= 20 and r >= 1 and p >= 1):
        return False
    secret = password.encode() if isinstance(password, str) else password
    key = _scrypt(secret, _unb64(match["salt"]), ln, r, p)
    return hmac.compare_digest(key, _unb64(match["key"]))


class UsersFileError(Exception):
    """The users file cannot be used; the message names the file and the problem."""


def parse_users(text: str, source: str) -> dict[str, str]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsersFileError(f"{source}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsersFileError(f"{source}: must be a map of user name to password hash")
    users: dict[str, str] = {}
    for name, encoded in data.items():
        if not isinstance(encoded, str) or _HASH.match(encoded) is None:
            raise UsersFileError(
                f"{source}: user {name!r}: not a $scrypt$ hash (make one with "
                "`smtprelay hash-password`)"
            )
        users[str(name)] = encoded
    return users


class Users:
    """The users file, re-read when its identity or modification time changes.

    A Secret volume is updated by swapping a symlink, so the file's inode changes too; a
    broken update keeps the users last read and reports the problem once.
    """

    def __init__(self, path: Path, *, on_error: Callable[[str], None] | None = None) -> None:
        self._path = path
        self._on_error = on_error
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._verified: dict[str, bytes] = {}
        self._pepper = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._checks = asyncio.Semaphore(2)
        self.reload(strict=True)

    def reload(self, *, strict: bool = False) -> None:
        """Read the file if it changed; ``strict`` raises instead of keeping the old users."""
        try:
            status = os.stat(self._path)
            stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
            if stamp == self._stamp:
                return
            users = parse_users(self._path.read_text(encoding="utf-8"), str(self._path))
        except (OSError, UsersFileError) as error:
            message = str(error) if isinstance(error, UsersFileError) else f"{self._path}: {error}"
            if strict:
                raise UsersFileError(message) from None
            if self._on_error is not None:
                self._on_error(message)
            return
        with self._lock:
            self._users = users
            self._verified = {}
            self._stamp = stamp

    def _fingerprint(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._pepper, user.encode() + b"\0" + password, "sha256").digest()

    def _check(self, user: str, password: bytes) -> bool:
        with self._lock:
            encoded = self._users.get(user)
            remembered = self._verified.get(user)
        if encoded is None:
            # the same cost as a wrong password, so timing does not tell which users exist
            _scrypt(password, bytes(_SALT_BYTES), LOG2_N, BLOCK_SIZE, PARALLELISM)
            return False
        fingerprint = self._fingerprint(user, password)
        if remembered is not None and hmac.compare_digest(remembered, fingerprint):
            return True  # an application that authenticates on every connection pays once
        if not verify_password(password, encoded):
            return False
        with self._lock:
            self._verified[user] = fingerprint
        return True

    async def check(self, user: str, password: bytes) -> bool:
        """True when ``user`` exists and ``password`` is theirs."""
        self.reload()
        async with self._checks:
            return await asyncio.to_thread(self._check, user, password)


class FailureLimiter:
    """Failed AUTH attempts per client address: after ``limit`` in ``window`` seconds, the
    address is refused until the oldest of them ages out."""

    def __init__(
        self,
        *,
        limit: int = 5,
        window: float = 300.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window
        self._max_clients = max_clients
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}

    def _recent(self, client: str) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        cutoff = self._clock() - self._window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def blocked(self, client: str) -> bool:
        """True when the client's recent failures, counting the checks still running as
        failures, reach the limit: parallel sessions cannot outrun the limiter."""
        times = self._recent(client)
        failures = len(times) if times is not None else 0
        return failures + self._in_flight.get(client, 0) >= self._limit

    def begin(self, client: str) -> None:
        """A password check for ``client`` starts; `end` when it is settled."""
        self._in_flight[client] = self._in_flight.get(client, 0) + 1

    def end(self, client: str) -> None:
        left = self._in_flight.get(client, 0) - 1
        if left > 0:
            self._in_flight[client] = left
        else:
            self._in_flight.pop(client, None)

    def failed(self, client: str) -> bool:
        """Record a failure; True when the client is now blocked."""
        if client not in self._failures and len(self._failures) >= self._max_clients:
            for other in list(self._failures)[: self._max_clients // 10]:
                self._recent(other)  # drop the aged-out; memory stays bounded
            if len(self._failures) >= self._max_clients:
                self._failures.pop(next(iter(self._failures)))
        times = self._recent(client) or self._failures.setdefault(client, deque())
        times.append(self._clock())
        return len(times) >= self._limit

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
