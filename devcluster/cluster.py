"""The whole local cluster with a real node: what `make demo` and tests/e2e run on.

Order matters: the node IP goes on `lo` first, because the API server listens there (pods
reach it through the `kubernetes` Service); then the control plane (without kwok), the
node, the volume provisioner, and the relay image imported into containerd. `stop()`
reverses it and returns what could not be put back on the host (empty when all was).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from devcluster import build, controlplane, hostnet, image, node, nodebuild
from devcluster.cache import cache_root
from devcluster.controlplane import ControlPlane, StartError

_PROVISIONER = "provisioner"
_HELD: list[IO[str]] = []
ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Cluster:
    run_dir: Path
    plane: ControlPlane
    node: node.Node
    image: image.Image
    provisioner_pid: int

    @property
    def host_state(self) -> Path:
        return self.run_dir / "host.json"

    def stop(self) -> list[str]:
        controlplane.terminate(self.provisioner_pid, owner_marker=str(self.run_dir))
        self.node.stop()
        self.plane.stop(keep_run_dir=True)
        problems = hostnet.HostChanges.load(self.host_state).restore()
        if not problems:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        _release()
        return problems

    def save_state(self, path: Path) -> None:
        state = {
            "run_dir": str(self.run_dir),
            "plane": dataclasses.asdict(self.plane),
            "node_pids": self.node.pids,
            "image": dataclasses.asdict(self.image),
            "provisioner_pid": self.provisioner_pid,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, default=str, indent=2) + "\n")

    @classmethod
    def load_state(cls, path: Path) -> Cluster:
        state = json.loads(path.read_text())
        plane_state = path.with_suffix(".plane.json")
        plane_state.write_text(json.dumps(state["plane"]))
        plane = ControlPlane.load_state(plane_state)
        plane_state.unlink()
        run_dir = Path(state["run_dir"])
        return cls(
            run_dir=run_dir,
            plane=plane,
            node=node.Node(
                run_dir=run_dir / "node",
                pids={k: int(v) for k, v in state["node_pids"].items()},
                binaries=nodebuild.ensure_node_built(),
            ),
            image=image.Image(
                archive=Path(state["image"]["archive"]),
                name=state["image"]["name"],
                key=state["image"]["key"],
            ),
            provisioner_pid=int(state["provisioner_pid"]),
        )


def state_file() -> Path:
    """Where `python -m devcluster up` records the running cluster for `down`."""
    return cache_root() / "cluster.json"


def _say(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def ensure_built() -> tuple[Path, nodebuild.NodeBinaries, image.Image]:
    """Everything the cluster runs: control plane, node binaries, pause and relay images.

    The image build waits mostly on the Debian mirror and PyPI, the Go builds on the CPU,
    so on a cold machine they run side by side.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        relay_image = pool.submit(image.ensure_image)
        bin_dir = build.ensure_built()
        binaries = nodebuild.ensure_node_built()
        return bin_dir, binaries, relay_image.result()


def _one_node_at_a_time(timeout: float = 900.0) -> None:
    """The node IP, bridge and iptables rules exist once per machine: a second session
    (another pytest run, a demo) waits here until the first has stopped and restored."""
    path = cache_root() / "node.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.open("w")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StartError(f"another local cluster held {path} for {timeout:.0f}s") from None
            time.sleep(1)  # polling a lock another process holds; bounded by the deadline
            continue
        if (
            node.NODE_IP
            not in subprocess.run(
                ["ip", "-4", "addr", "show", "dev", "lo"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        ):
            _HELD.append(lock)  # held for this process's life; stop() releases it
            return
        # Held by nobody, yet a node is up: `python -m devcluster up` left one running.
        fcntl.flock(lock, fcntl.LOCK_UN)
        if time.monotonic() >= deadline:
            raise StartError(f"{node.NODE_IP} is on lo: run `python -m devcluster down`")
        time.sleep(1)


def _release() -> None:
    while _HELD:
        _HELD.pop().close()


def start(*, run_dir: Path | None = None) -> Cluster:
    bin_dir, binaries, relay_image = ensure_built()
    _one_node_at_a_time()
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="smtprelay-cluster-"))
    changes = hostnet.HostChanges(
        address=node.NODE_IP,
        routes=[controlplane.SERVICE_CIDR, node.POD_SUBNET],
        bridge=node.BRIDGE,
        mount_root=str(run_dir),
    )
    changes.record()
    state = run_dir / "host.json"
    changes.save(state)
    started = time.monotonic()
    with contextlib.ExitStack() as undo:
        undo.callback(_release)
        undo.callback(lambda: _restore(changes, state))
        changes.add_address()
        changes.save(state)
        plane = controlplane.start(
            bin_dir=bin_dir, run_dir=run_dir / "plane", address=node.NODE_IP, kwok=False
        )
        undo.callback(plane.stop, keep_run_dir=True)
        _say(f"control plane up at {plane.server} ({time.monotonic() - started:.1f}s)")
        the_node = node.start(plane, binaries, run_dir=run_dir / "node", changes=changes)
        changes.save(state)
        undo.callback(the_node.stop)
        _say(f"node {node.NODE_NAME} Ready at {node.NODE_IP} ({time.monotonic() - started:.1f}s)")
        launcher = controlplane.Launcher(run_dir=run_dir, bin_dir=Path(sys.executable).parent)
        launcher.start(
            _PROVISIONER,
            sys.executable,
            [
                "-m",
                "devcluster.provisioner",
                f"--kubeconfig={plane.kubeconfig}",
                f"--root={run_dir / 'volumes'}",
                f"--node={node.NODE_NAME}",
            ],
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        provisioner_pid = launcher.processes[_PROVISIONER].pid
        undo.callback(controlplane.terminate, provisioner_pid, owner_marker=str(run_dir))
        the_node.import_image(relay_image.archive)
        _say(f"{relay_image.name} imported ({time.monotonic() - started:.1f}s)")
        launcher.await_healthy(
            _PROVISIONER,
            lambda: bool(plane.kubectl("get", "storageclass", "-o", "name", check=False)),
        )
        undo.pop_all()
        return Cluster(
            run_dir=run_dir,
            plane=plane,
            node=the_node,
            image=relay_image,
            provisioner_pid=provisioner_pid,
        )
    raise StartError("unreachable")  # pragma: no cover - the with block returns or raises


def _restore(changes: hostnet.HostChanges, state: Path) -> None:
    problems = hostnet.HostChanges.load(state).restore() if state.exists() else changes.restore()
    if problems:
        _say(f"could not restore the host fully: {problems}")
