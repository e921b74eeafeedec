"""A real node on this machine: containerd + runc, kubelet, kube-proxy and a CNI bridge.

Pods run for real (the relay image, its volumes, probes and signals) but nothing of theirs
leaves the machine: the node's IP is a /32 this module puts on `lo`, pods get routes only to
the Service range and the node IP (no default route), and an iptables rule drops anything
forwarded off the bridge. Every process is stopped by PID; `HostChanges` puts the address,
routes, iptables rules, sysctls, mounts and cgroups back as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from devcluster import controlplane, hostnet, kubeconfig, pki
from devcluster.controlplane import ControlPlane, StartError, free_port
from devcluster.nodebuild import PAUSE_IMAGE, NodeBinaries

NODE_NAME = "smtprelay-node"
NODE_IP = "10.233.0.1"  # on lo, /32; nothing else on this machine uses 10.233/16
POD_SUBNET = "10.244.200.0/24"  # inside the control plane's pod CIDR, away from kwok's
POD_GATEWAY = "10.244.200.1"
BRIDGE = "smtprelay0"
_FORWARD_RULES = (
    ("-i", BRIDGE, "!", "-o", BRIDGE),  # pods → anywhere but the bridge
    ("!", "-i", BRIDGE, "-o", BRIDGE),  # anywhere but the bridge → pods
)
_STOP_ORDER = ("kube-proxy", "kubelet", "containerd")
_READY_TIMEOUT = 90.0


@dataclasses.dataclass(frozen=True)
class Node:
    """A running node: its processes, files and the host changes to undo."""

    run_dir: Path
    pids: dict[str, int]
    binaries: NodeBinaries

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd" / "containerd.sock"

    def log(self, component: str) -> Path:
        return self.run_dir / "logs" / f"{component}.log"

    def ctr(self, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run(
            [str(self.binaries.containerd("ctr")), f"--address={self.socket}", "-n=k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def import_image(self, archive: Path) -> None:
        """What a registry pull would do: the image lands in the k8s.io namespace CRI uses."""
        self.ctr("images", "import", "--no-unpack=false", str(archive), timeout=300)

    def stop(self) -> None:
        """Stop the kubelet (so nothing restarts), every container, then containerd."""
        for name in ("kube-proxy", "kubelet"):
            pid = self.pids.get(name)
            if pid is not None:
                controlplane.terminate(pid, owner_marker=str(self.run_dir))
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            for task in self.ctr("tasks", "ls", "-q").split():
                self.ctr("tasks", "kill", "--all", "--signal=SIGKILL", task)
        pid = self.pids.get("containerd")
        if pid is not None:
            controlplane.terminate(pid, owner_marker=str(self.run_dir))
        _stop_shims(self.run_dir)


def _stop_shims(run_dir: Path) -> None:
    """containerd's shims outlive it by design; ours name our socket on their command line."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes()
                if b"containerd-shim" in cmdline and str(run_dir).encode() in cmdline:
                    controlplane.terminate(int(proc.name), owner_marker=str(run_dir), grace=5)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def containerd_config(run_dir: Path, binaries: NodeBinaries, cni_conf_dir: Path) -> str:
    """containerd 2.x (config version 3), everything it writes kept under `run_dir`."""
    base = run_dir / "containerd"
    cri_runtime = "plugins.'io.containerd.cri.v1.runtime'"
    runc = f"{cri_runtime}.containerd.runtimes.runc"
    tables: dict[str, dict[str, Any]] = {
        "": {"version": 3, "root": base / "root", "state": base / "state"},
        "grpc": {"address": base / "containerd.sock"},
        "ttrpc": {"address": base / "containerd.sock.ttrpc"},
        "plugins.'io.containerd.internal.v1.opt'": {"path": base / "opt"},
        "plugins.'io.containerd.cri.v1.images'": {"snapshotter": "overlayfs"},
        "plugins.'io.containerd.cri.v1.images'.pinned_images": {"sandbox": PAUSE_IMAGE},
        # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj below ours: every sandbox
        # would fail with "can't get final child's PID from pipe: EOF".
        cri_runtime: {"restrict_oom_score_adj": True, "netns_mounts_under_state_dir": True},
        f"{cri_runtime}.cni": {"bin_dirs": [str(binaries.cni_dir)], "conf_dir": cni_conf_dir},
        f"{cri_runtime}.containerd": {"default_runtime_name": "runc"},
        runc: {"runtime_type": "io.containerd.runc.v2"},
        f"{runc}.options": {
            "BinaryName": binaries.runc,
            "Root": base / "runc",
            "SystemdCgroup": False,
        },
    }
    lines = ["disabled_plugins = ['io.containerd.nri.v1.nri']"]
    for table, values in tables.items():
        if table:
            lines.append(f"\n[{table}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def cni_config(run_dir: Path, service_cidr: str) -> dict[str, Any]:
    """A bridge with routes to Services and the node only: no default route out."""
    return {
        "cniVersion": "1.0.0",
        "name": "smtprelay",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY}]],
                    "routes": [{"dst": service_cidr}, {"dst": f"{NODE_IP}/32"}],
                    "dataDir": str(run_dir / "cni-ipam"),
                },
            }
        ],
    }


def kubelet_config(run_dir: Path, *, ca: Path, socket_path: Path, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port(),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{socket_path}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,  # this machine's cgroups are v1 (hybrid)
        "failSwapOn": False,
        "clusterDomain": "cluster.local",
        "resolvConf": str(run_dir / "resolv.conf"),
        "volumePluginDir": str(run_dir / "kubelet-plugins"),
        "podLogsDir": str(run_dir / "pod-logs"),  # not /var/log/pods
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "serializeImagePulls": False,
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
    }


def kube_proxy_config(*, kubeconfig_path: Path, cluster_cidr: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig_path)},
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{free_port()}",
        "metricsBindAddress": f"127.0.0.1:{free_port()}",
        "clusterCIDR": cluster_cidr,
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Leave the host's conntrack settings alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def _node_kubeconfig(plane: ControlPlane, directory: Path, *, user: str, group: str) -> Path:
    stem = user.replace(":", "-")
    pair = pki.client_cert(plane.ca, directory / "pki", stem=stem, user=user, group=group)
    return kubeconfig.write_client_cert(
        directory / f"{stem}.kubeconfig",
        server=plane.server,
        ca_pem=plane.ca_cert.read_bytes(),
        user=user,
        cert_pem=pair.cert_pem(),
        key_pem=pair.key_pem(),
    )


def _iptables_guard() -> None:
    for rule in _FORWARD_RULES:
        subprocess.run(
            ["iptables", "-I", "FORWARD", "1", *rule, "-j", "DROP"],
            check=True,
            capture_output=True,
            timeout=30,
        )


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _node_ready(plane: ControlPlane) -> bool:
    out = plane.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
    if not out:
        return False
    conditions = json.loads(out).get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def start(
    plane: ControlPlane, binaries: NodeBinaries, *, run_dir: Path, changes: hostnet.HostChanges
) -> Node:
    """Start the node next to `plane` (listening on NODE_IP, which `changes` put on lo);
    returns once the node is Ready. `changes` learns the routes it adds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    launcher = controlplane.Launcher(run_dir=run_dir, bin_dir=binaries.kube_dir)
    try:
        return _start(plane, binaries, launcher, changes)
    except (StartError, TimeoutError, OSError, RuntimeError, subprocess.SubprocessError) as error:
        diagnostics = launcher.diagnostics()
        launcher.kill_all(_STOP_ORDER)
        _stop_shims(run_dir)
        raise StartError(f"node failed to start: {error}\n{diagnostics}") from error


def _start(
    plane: ControlPlane,
    binaries: NodeBinaries,
    launcher: controlplane.Launcher,
    changes: hostnet.HostChanges,
) -> Node:
    run_dir = launcher.run_dir
    _iptables_guard()
    (run_dir / "resolv.conf").write_text("")
    cni_dir = run_dir / "cni" / "net.d"
    cni_dir.mkdir(parents=True, exist_ok=True)
    (cni_dir / "10-smtprelay.conflist").write_text(
        json.dumps(cni_config(run_dir, controlplane.SERVICE_CIDR), indent=2)
    )
    config = run_dir / "containerd.toml"
    config.write_text(containerd_config(run_dir, binaries, cni_dir))
    socket_path = run_dir / "containerd" / "containerd.sock"
    launcher.start("containerd", str(binaries.containerd("containerd")), [f"--config={config}"])
    launcher.await_healthy("containerd", lambda: _socket_answers(socket_path))
    node = Node(
        run_dir=run_dir,
        pids={name: p.pid for name, p in launcher.processes.items()},
        binaries=binaries,
    )
    node.import_image(binaries.pause_archive)

    kubelet_kubeconfig = _node_kubeconfig(
        plane, run_dir, user=f"system:node:{NODE_NAME}", group="system:nodes"
    )
    kubelet_file = run_dir / "kubelet.yaml"
    kubelet_file.write_text(
        yaml.safe_dump(
            kubelet_config(run_dir, ca=plane.ca_cert, socket_path=socket_path, port=free_port())
        )
    )
    launcher.start(
        "kubelet",
        "kubelet",
        [
            f"--config={kubelet_file}",
            f"--kubeconfig={kubelet_kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            f"--root-dir={run_dir / 'kubelet'}",
            f"--cert-dir={run_dir / 'kubelet-pki'}",
        ],
    )
    proxy_kubeconfig = _node_kubeconfig(plane, run_dir, user="system:kube-proxy", group="")
    proxy_file = run_dir / "kube-proxy.yaml"
    proxy_file.write_text(
        yaml.safe_dump(
            kube_proxy_config(kubeconfig_path=proxy_kubeconfig, cluster_cidr=controlplane.POD_CIDR)
        )
    )
    launcher.start("kube-proxy", "kube-proxy", [f"--config={proxy_file}"])
    launcher.await_healthy("kubelet", lambda: _node_ready(plane))
    # The CNI plugin adopts an existing bridge; making it now lets the host's routes for
    # Services and pods point at it before the first pod, so they never take the default.
    if not _bridge_exists():
        _make_bridge()
    changes.add_routes()
    return dataclasses.replace(node, pids={n: p.pid for n, p in launcher.processes.items()})


def _bridge_exists() -> bool:
    result = subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True, check=False)
    return result.returncode == 0


def _make_bridge() -> None:
    """Create the bridge the CNI plugin would (it adopts an existing one), with its gateway."""
    prefix = POD_SUBNET.split("/")[1]
    for args in (
        ["link", "add", BRIDGE, "type", "bridge"],
        ["addr", "add", f"{POD_GATEWAY}/{prefix}", "dev", BRIDGE],
        ["link", "set", BRIDGE, "up"],
    ):
        subprocess.run(["ip", *args], capture_output=True, check=True, timeout=30)
