"""What a real node changes on this machine, recorded before and put back after.

kubelet, kube-proxy, containerd and the CNI bridge touch host state: an address and routes,
iptables chains, sysctls, mounts and cgroups. `HostChanges` records the state first (into
the node's state file too, so `python -m devcluster down` can undo a run that crashed) and
`restore()` undoes every one of them. Only loopback and networks made here are touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
from pathlib import Path

# kubelet sets the first three at start (protectKernelDefaults=false); the bridge plugin
# turns on forwarding; kube-proxy may set route_localnet and needs bridged traffic seen.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
)
_CGROUP_ROOT = Path("/sys/fs/cgroup")
# Every cgroup the node creates lives under these names in each hierarchy.
_CGROUP_NAMES = ("kubepods", "kubepods.slice")


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        _sysctl_path(name).write_text(value + "\n")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _save_rules(family: str) -> str:
    result = subprocess.run(
        [f"{family}-save"], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout


def _tables(rules: str) -> set[str]:
    return set(re.findall(r"^\*(\w+)", rules, re.MULTILINE))


def _restore_rules(family: str, saved: str) -> None:
    """Back to `saved`: tables it names are rewritten whole; tables that did not exist
    then (often all of them on a fresh machine) are emptied of every rule and chain."""
    for table in sorted(_tables(_save_rules(family)) - _tables(saved)):
        for flag in ("-F", "-X"):
            subprocess.run([family, "-t", table, flag], capture_output=True, check=False)
    if saved.strip():
        subprocess.run(
            [f"{family}-restore"], input=saved, capture_output=True, text=True, check=True
        )


def _rule_lines(rules: str) -> list[str]:
    """The rules and non-builtin chains of a dump, without counters and comments."""
    return [
        line
        for line in rules.splitlines()
        if line.startswith("-A") or (line.startswith(":") and line.split()[1] != "ACCEPT")
    ]


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (the order to unmount them)."""
    prefix = str(directory.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def unmount_all(directory: Path) -> None:
    for point in mounts_under(directory):
        result = subprocess.run(["umount", point], capture_output=True, check=False)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_cgroups() -> None:
    """rmdir the node's cgroups bottom-up in every hierarchy (empty once its pods are gone)."""
    for hierarchy in _CGROUP_ROOT.iterdir():
        for name in _CGROUP_NAMES:
            top = hierarchy / name
            if not top.is_dir():
                continue
            for directory in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                if directory.is_dir():
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


@dataclasses.dataclass
class HostChanges:
    """The host as it was before the node, and what the node adds to it."""

    address: str  # a /32 on lo: kubelet refuses a loopback node IP
    routes: list[str]  # destinations routed to the node's bridge
    bridge: str
    mount_root: str
    sysctls: dict[str, str] = dataclasses.field(default_factory=dict)
    iptables: str = ""
    ip6tables: str = ""
    applied: list[str] = dataclasses.field(default_factory=list)

    def record(self) -> None:
        """Remember what is about to change; call before anything is started."""
        self.sysctls = {n: v for n in SYSCTLS if (v := read_sysctl(n)) is not None}
        self.iptables = _save_rules("iptables")
        self.ip6tables = _save_rules("ip6tables")

    def add_address(self) -> None:
        existing = _ip("-4", "addr", "show", "dev", "lo").stdout
        if f" {self.address}/" in existing:
            raise RuntimeError(f"{self.address} is already on lo: is another node up?")
        _ip("addr", "add", f"{self.address}/32", "dev", "lo")
        self.applied.append("address")

    def add_routes(self) -> None:
        """After the bridge exists: Service and pod traffic from the host goes to it only."""
        for destination in self.routes:
            _ip("route", "replace", destination, "dev", self.bridge)
        self.applied.append("routes")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> HostChanges:
        return cls(**json.loads(path.read_text()))

    def restore(self) -> list[str]:
        """Undo everything; returns what could not be undone (empty when all went back)."""
        problems: list[str] = []
        unmount_all(Path(self.mount_root))
        left = mounts_under(Path(self.mount_root))
        if left:
            problems.append(f"mounts left: {left}")
        for destination in self.routes:
            _ip("route", "del", destination, "dev", self.bridge, check=False)
        _ip("link", "del", self.bridge, check=False)
        if f" {self.address}/" in _ip("-4", "addr", "show", "dev", "lo").stdout:
            _ip("addr", "del", f"{self.address}/32", "dev", "lo", check=False)
        _restore_rules("iptables", self.iptables)
        _restore_rules("ip6tables", self.ip6tables)
        for family, saved in (("iptables", self.iptables), ("ip6tables", self.ip6tables)):
            now = _rule_lines(_save_rules(family))
            if now != _rule_lines(saved):
                problems.append(f"{family} rules differ from before: {now[:5]}")
        for name, value in self.sysctls.items():
            write_sysctl(name, value)
            if read_sysctl(name) != value:
                problems.append(f"sysctl {name} is {read_sysctl(name)}, was {value}")
        remove_cgroups()
        return problems
