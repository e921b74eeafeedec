"""How many CPUs this process may use: its affinity, capped by its container's CPU limit.

The worker count and `queue list`'s fork both size themselves by it: a pod limited to one
CPU on a 16-core node should not run 16 workers, nor fork to read its queue.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The container's CPU limit in CPUs (a pod's ``resources.limits.cpu``), or None.

    cgroup v2 keeps it in ``cpu.max`` ("max 100000" when unlimited); cgroup v1 in the cpu
    controller's ``cpu.cfs_quota_us`` (-1 when unlimited) and ``cpu.cfs_period_us``. The
    container runtime mounts the container's own cgroup at ``root``.
    """
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    for controller in ("cpu", "cpu,cpuacct"):
        with contextlib.suppress(OSError, ValueError):
            quota_us = int((root / controller / "cpu.cfs_quota_us").read_text())
            period_us = int((root / controller / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on, capped by the container's CPU limit (rounded up)."""
    count = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)
