"""`make demo`: an SmtpRelay manifest becomes a working relay that delivers a message.

Starts the local control plane (built from source on first use), installs the CRD, runs the
operator, applies examples/smtprelay.yaml and waits for it to go Ready; then, since no
kubelet runs containers here, starts the relay exactly as its pod would (tests/podsim.py) and
relays a message with swaks to an MX sink that a local dnsmasq names. Leaves nothing running,
unless --keep, which leaves the cluster up for kubectl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests import podsim
from tests.cluster import build, controlplane
from tests.peers import Dnsmasq, Sink, Zone, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "default"
MX_HOST = "127.0.0.2"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str, indent: str = "    ") -> None:
    for line in text.rstrip().splitlines():
        print(f"{indent}{line}", flush=True)


@contextlib.contextmanager
def operator(plane: controlplane.ControlPlane, log_path: Path) -> Iterator[None]:
    port = free_port()
    env = plane.env()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                shutil.which("smtprelay-operator") or "smtprelay-operator",
                f"--liveness=http://127.0.0.1:{port}/healthz",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def live() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_for(live, timeout=60, what="the operator's liveness endpoint")
        show(f"smtprelay-operator running (pid {process.pid}), log: {log_path}")
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spool_volume(plane: controlplane.ControlPlane, relay: str, path: Path) -> None:
    """This cluster has no storage provisioner: a PersistentVolume pre-bound to the claim."""
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"demo-{relay}-spool"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(path)},
            "claimRef": {"namespace": NAMESPACE, "name": f"{relay}-spool"},
        },
    }
    apply(plane, volume)


def apply(plane: controlplane.ControlPlane, manifest: dict[str, Any]) -> str:
    result = subprocess.run(
        [str(plane.bin_dir / "kubectl"), "apply", "-f", "-"],
        input=json.dumps(manifest),
        env=plane.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {result.stderr}")
    return result.stdout


def get(plane: controlplane.ControlPlane, kind: str, name: str) -> dict[str, Any]:
    text = plane.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json")
    document: dict[str, Any] = json.loads(text)
    return document


def watch_ready(plane: controlplane.ControlPlane, name: str, timeout: float = 120) -> None:
    """Print `kubectl get smtprelays` each time it changes, until Ready is True."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = plane.kubectl("get", "smtprelays", "-n", NAMESPACE)
        if table != seen:
            show(table if not seen else table.splitlines()[-1])
            seen = table
        status = json.loads(plane.kubectl("get", "smtprelay", name, "-n", NAMESPACE, "-o", "json"))
        conditions = status.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            plane.kubectl("wait", "--for=condition=Ready", f"smtprelay/{name}", "-n", NAMESPACE)
            show(f"$ kubectl wait --for=condition=Ready smtprelay/{name}  → condition met")
            return
        time.sleep(0.5)  # a human-paced refresh of the table; the loop is bounded above
    raise RuntimeError(f"smtprelay/{name} did not become Ready in {timeout}s")


def run(args: argparse.Namespace, workdir: Path) -> int:  # noqa: PLR0915 -- one story, top to bottom
    step("Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)")
    bin_dir = build.ensure_built()
    plane = controlplane.start(bin_dir=bin_dir)
    show(f"API server {plane.server}; kubeconfig {plane.kubeconfig}")
    stack = contextlib.ExitStack()
    if not args.keep:
        stack.callback(plane.stop)
    with stack:
        os.environ["PATH"] = f"{plane.bin_dir}{os.pathsep}{os.environ['PATH']}"

        step("Installing the CRD: kubectl apply -f crds/")
        show(plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds")))
        plane.kubectl(
            "wait", "--for=condition=Established", "crd/smtprelays.smtprelay.dev", "--timeout=60s"
        )
        wait_for(
            lambda: plane.kubectl("get", "smtprelays", check=False) is not None,
            timeout=30,
            what="SmtpRelay to be served",
        )

        step("Starting the operator: smtprelay-operator")
        stack.enter_context(operator(plane, workdir / "operator.log"))

        step("Local mail world: dnsmasq names the MX of example.test; an SMTP sink is that MX")
        mx_port = free_port()
        dns = Dnsmasq(
            Zone(mx=[("example.test", "mx.example.test", 10)], a=[("mx.example.test", MX_HOST)]),
            workdir,
        )
        stack.callback(dns.stop)
        sink = Sink(MX_HOST, mx_port)
        stack.callback(sink.stop)
        show(f"dnsmasq at {dns.server}: example.test MX 10 mx.example.test → {MX_HOST}")
        show(f"MX sink (aiosmtpd) at {MX_HOST}:{mx_port}")

        step("Applying examples/smtprelay.yaml (pointed at the local DNS server and MX port)")
        manifest = yaml.safe_load((ROOT / "examples" / "smtprelay.yaml").read_text())
        name = manifest["metadata"]["name"]
        manifest["metadata"]["namespace"] = NAMESPACE
        manifest["spec"]["dnsServers"] = [dns.server]
        manifest["spec"]["allowedNetworks"] = ["127.0.0.0/8"]  # this machine's "pod network"
        manifest["spec"].setdefault("delivery", {})["port"] = mx_port
        show(yaml.safe_dump(manifest, sort_keys=False))
        spool_volume(plane, name, workdir / "node-volume")
        show(apply(plane, manifest))

        step("kubectl get smtprelays — waiting for Ready (the pod runs on a kwok node)")
        watch_ready(plane, name)

        step("What the operator made")
        show(
            plane.kubectl(
                "get",
                "configmap,deployment,pvc,service",
                "-n",
                NAMESPACE,
                "-l",
                f"app.kubernetes.io/instance={name}",
            )
        )
        config_map = get(plane, "configmap", f"{name}-config")
        deployment = get(plane, "deployment", name)
        show("relay.yaml from the ConfigMap:")
        show(config_map["data"]["relay.yaml"], indent="      ")

        step("Starting the relay as its pod would (command, env and config from the rendering)")
        pod = podsim.prepare(
            deployment=deployment,
            config_maps={config_map["metadata"]["name"]: config_map},
            workdir=workdir / "pod",
        )
        show("$ " + " ".join(pod.argv))
        pod.start()
        stack.callback(pod.stop)
        show(f"listening on 127.0.0.1:{pod.smtp_port} (the Service's port 25 in a cluster)")

        step("Sending a message with swaks through the relay")
        result = subprocess.run(
            [
                "swaks",
                "--server",
                "127.0.0.1",
                "--port",
                str(pod.smtp_port),
                "--from",
                "app@demo.example.com",
                "--to",
                "bob@example.test",
                "--header",
                "Subject: hello from the demo",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        show(
            "\n".join(
                line for line in result.stdout.splitlines() if line.startswith(("===", " ->", "<-"))
            )
        )
        if result.returncode != 0:
            raise RuntimeError(f"swaks failed:\n{result.stdout}{result.stderr}")

        [got] = sink.wait_for_messages(timeout=30)
        step("Delivered")
        show(f"to the MX of example.test, {MX_HOST}:{mx_port}")
        show(f"envelope: from <{got.sender}> to {', '.join(got.recipients)}")
        show(f"Subject: {got.message['Subject']}")
        show(f"Received: {' '.join(str(got.message['Received']).split())}")
        wait_for(lambda: pod.queued() == [], timeout=15, what="the spool to empty")
        show("spool empty; relay stopping (SIGTERM) …")

        if args.keep:
            step("The cluster stays up (--keep). To use it:")
            show(f"export KUBECONFIG={plane.kubeconfig}")
            show(f"export PATH={plane.bin_dir}:$PATH")
            show("kubectl get smtprelays")
            show(f"When done: kill the control plane's processes: {sorted(plane.pids.values())}")
            plane.save_state(build.bin_dir().parent / "current.json")
            show("or: python -m tests.cluster down")
    print("\nDemo complete.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smtprelay-demo-") as workdir:
        try:
            return run(args, Path(workdir))
        except (RuntimeError, AssertionError, build.BuildError, controlplane.StartError) as error:
            print(f"\ndemo failed: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
