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


def cpu_times(stat: str) -> tuple[int, int]:
    """(all, steal) jiffies from the aggregate ``cpu`` line of /proc/stat's text."""
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(value) for value in fields[1:]]
            # user nice system idle iowait irq softirq steal [guest guest_nice, in user]
            return sum(ticks[:8]), ticks[7] if len(ticks) > 7 else 0
    return 0, 0


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time the hypervisor gave to others between two `cpu_times`."""
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else 0.0


def _now_cpu_times() -> tuple[int, int]:
    try:
        return cpu_times(Path("/proc/stat").read_text())
    except OSError:
        return 0, 0


_STARTED = _now_cpu_times()


def machine() -> str:
    """CPUs, load average, and the CPU time stolen by the hypervisor since the bench
    started: on a shared VM that, not the code, can move a figure by a third."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    steal = steal_share(_STARTED, _now_cpu_times())
    return f"{os.cpu_count()} CPUs, load average {load}, CPU steal {steal:.1%} during the run"


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
