"""What the benchmarks print: medians with their spread, and where the bench ran."""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """``median (min–max, n=…)``; a single value is printed alone."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)} ({fmt.format(low)}–{fmt.format(high)}, n={len(values)})"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def filesystem(path: Path) -> str:
    """``fstype on device`` of the mount holding ``path``, from /proc/self/mountinfo."""
    target = str(path.resolve())
    best, found = "", "unknown"
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            mount = left.split()[4]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                fstype, device = right.split()[:2]
                best, found = mount, f"{fstype} on {device} (mounted at {mount})"
    return found


def machine() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, so results paste straight into bench/README.md."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def revision() -> str:
    """The commit measured, flagged when the relay's sources differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except OSError:
            return ""
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "relay")
    return f"{head} + uncommitted relay changes" if dirty else head
