"""Watching processes from /proc: memory and CPU of a process tree, sampled while it works."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(name))
    return tree


def tree_pids(root: int) -> list[int]:
    """``root`` and every descendant alive now."""
    tree = _children()
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, ()))
    return pids


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    """Resident and proportional set size; PSS splits shared pages, so it sums fairly."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except (OSError, ValueError):
        return 0, 0
    rss = int(fields.get("Rss", "0 kB").split()[0])
    pss = int(fields.get("Pss", "0 kB").split()[0])
    return rss, pss


def cpu_seconds(root: int) -> float:
    """CPU used by the live tree, plus what its reaped children used (``cutime``/``cstime``).

    Postfix's master reaps its daemons, so their CPU lands in master's ``c`` fields.
    """
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        total += utime + stime + (cutime + cstime if pid == root else 0)
    return total / _TICKS


@dataclass
class Memory:
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    last_rss_kib: int = 0
    last_pss_kib: int = 0
    peak_processes: int = 0


class TreeSampler:
    """Samples the summed RSS and PSS of a process tree in a thread, keeping the peaks."""

    def __init__(self, root: int, *, interval: float = 0.1) -> None:
        self.root = root
        self.memory = Memory()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = tree_pids(self.root)
        rss = pss = 0
        for pid in pids:
            r, p = _rss_pss_kib(pid)
            rss += r
            pss += p
        memory = self.memory
        memory.last_rss_kib, memory.last_pss_kib = rss, pss
        memory.peak_rss_kib = max(memory.peak_rss_kib, rss)
        memory.peak_pss_kib = max(memory.peak_pss_kib, pss)
        memory.peak_processes = max(memory.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
