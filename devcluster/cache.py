"""Where the local cluster keeps what it builds, and how its steps report progress."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path


class BuildError(RuntimeError):
    """A build step failed; the message carries the tail of its output."""


def cache_root() -> Path:
    """`$SMTPRELAY_CACHE`, else `~/.cache/smtprelay`."""
    override = os.environ.get("SMTPRELAY_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "smtprelay"


def say(component: str, message: str) -> None:
    print(f"[{component}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serialise builders of one cache entry: two sessions racing a cold cache, one builds."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def tree_hash(root: Path, paths: Iterable[str], *, extra: str = "") -> str:
    """A short hash of file names and contents under `paths`, skipping build droppings."""
    digest = hashlib.sha256(extra.encode())
    for top in sorted(paths):
        base = root / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            parts = path.relative_to(root).parts
            if any(part == "__pycache__" or part.endswith(".egg-info") for part in parts):
                continue
            digest.update("/".join(parts).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def run(
    argv: list[str],
    *,
    component: str,
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    heartbeat: float = 20.0,
) -> str:
    """Run a build command, echoing a heartbeat; BuildError with the output's tail on failure."""
    started = time.monotonic()
    last_note = started
    tail: deque[str] = deque(maxlen=40)
    captured: list[str] = []
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            captured.append(line)
            now = time.monotonic()
            if now - last_note >= heartbeat:
                say(component, f"  {what}: {now - started:.0f}s, last: {tail[-1][:100]}")
                last_note = now
        code = proc.wait()
    if code != 0:
        shown = "\n".join(tail)
        raise BuildError(f"{what} failed ({argv[0]}, exit {code}):\n{shown}")
    say(component, f"  {what}: done in {time.monotonic() - started:.0f}s")
    return "".join(captured)
