"""`make demo`: an SmtpRelay manifest becomes a relay pod that delivers a message.

Builds what is missing (cached under ~/.cache/smtprelay; a cold first run takes about
COLD_MINUTES minutes on 2 cores, later runs under a minute), starts the local cluster with a
real node (containerd + runc, kubelet, kube-proxy; devcluster/), `helm install`s the chart
so the operator runs as a pod from the image built here, applies examples/smtprelay.yaml,
waits for Ready, and relays a message with swaks through the relay's Service ClusterIP to
an MX on this machine that a local dnsmasq names. Leaves nothing running and the host as it
was, unless --keep, which leaves the cluster up for kubectl (`python -m devcluster down`).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from devcluster import cluster, deploy, node
from devcluster.cache import BuildError
from devcluster.controlplane import ControlPlane, StartError
from tests.peers import Dnsmasq, Sink, Zone, free_port

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "default"
COLD_MINUTES = 15


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str, indent: str = "    ") -> None:
    for line in text.rstrip().splitlines():
        print(f"{indent}{line}", flush=True)


def watch_ready(plane: ControlPlane, name: str, timeout: float = 180) -> None:
    """Print `kubectl get smtprelays` each time it changes, until Ready is True."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = plane.kubectl("get", "smtprelays", "-n", NAMESPACE)
        if table != seen:
            show(table if not seen else table.splitlines()[-1])
            seen = table
        if deploy.is_true(deploy.get(plane, "smtprelay", name, NAMESPACE), "Ready"):
            show(f"$ kubectl wait --for=condition=Ready smtprelay/{name}  → condition met")
            return
        time.sleep(0.5)  # a human-paced refresh of the table; the loop is bounded above
    raise RuntimeError(f"smtprelay/{name} did not become Ready in {timeout}s")


def swaks(server: str, *, to: str) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            server,
            "--port",
            "25",
            "--from",
            "app@demo.example.com",
            "--to",
            to,
            "--header",
            "Subject: hello from the demo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    verbs = (" -> EHLO", " -> MAIL", " -> RCPT", " -> DATA", " -> QUIT")
    conversation = [line for line in result.stdout.splitlines() if line.startswith(("<", *verbs))]
    show("\n".join(conversation))
    if result.returncode != 0:
        raise RuntimeError(f"swaks failed:\n{result.stdout}{result.stderr}")


def run(args: argparse.Namespace, workdir: Path) -> int:  # noqa: PLR0915 -- one story, top to bottom
    began = time.monotonic()
    step(
        "Building what is missing: control plane, node (containerd, kubelet, kube-proxy), "
        f"relay image (cached; a cold first run takes about {COLD_MINUTES} min)"
    )
    cluster.ensure_built()
    show(f"ready after {time.monotonic() - began:.0f}s")

    step("Starting the cluster: control plane + a real node on this machine")
    running = cluster.start()
    plane = running.plane
    stack = contextlib.ExitStack()
    if args.keep:  # recorded at once, so `python -m devcluster down` stops it whatever happens
        running.save_state(cluster.state_file())
    else:
        stack.callback(running.stop)
    with stack:
        show(f"API server {plane.server}; node {node.NODE_NAME} at {node.NODE_IP}")
        show(plane.kubectl("get", "nodes", "-o", "wide"))

        step(f"helm install {deploy.RELEASE} charts/smtprelay-operator -n smtprelay-system")
        result = deploy.install_chart(plane)
        show(f"status: {result['status']}; the operator runs from {running.image.name}")
        show(plane.kubectl("get", "pods", "-n", deploy.OPERATOR_NAMESPACE, "-o", "wide"))

        step("Local mail world: dnsmasq names the MX of example.test; an SMTP sink is that MX")
        mx_port = free_port(node.NODE_IP)
        dns = Dnsmasq(
            Zone(
                mx=[("example.test", "mx.example.test", 10)], a=[("mx.example.test", node.NODE_IP)]
            ),
            workdir,
            address=node.NODE_IP,
        )
        stack.callback(dns.stop)
        sink = Sink(node.NODE_IP, mx_port)
        stack.callback(sink.stop)
        show(f"dnsmasq at {dns.server}: example.test MX 10 mx.example.test → {node.NODE_IP}")
        show(f"MX sink (aiosmtpd) at {node.NODE_IP}:{mx_port}")

        step("Applying examples/smtprelay.yaml (pointed at the local DNS server and MX port)")
        manifest = yaml.safe_load((ROOT / "examples" / "smtprelay.yaml").read_text())
        name = manifest["metadata"]["name"]
        manifest["metadata"]["namespace"] = NAMESPACE
        manifest["spec"]["dnsServers"] = [dns.server]
        manifest["spec"].setdefault("delivery", {})["port"] = mx_port
        show(deploy.apply(plane, manifest))

        step("kubectl get smtprelays — Ready once the kubelet's readiness probe passes")
        watch_ready(plane, name)

        step("What the operator made, and the pod the kubelet started")
        show(
            plane.kubectl(
                "get",
                "configmap,deployment,pvc,service,pods",
                "-n",
                NAMESPACE,
                "-l",
                f"app.kubernetes.io/instance={name}",
                "-o",
                "wide",
            )
        )
        address = deploy.service_ip(plane, name, NAMESPACE)

        step(f"Sending a message with swaks to the Service, {address}:25")
        try:
            swaks(address, to="bob@example.test")
        except RuntimeError:
            show(plane.kubectl("logs", "-n", NAMESPACE, f"deploy/{name}", "--tail=20"))
            raise
        [got] = sink.wait_for_messages(timeout=60)

        step("Delivered")
        show(f"to the MX of example.test, {node.NODE_IP}:{mx_port}")
        show(f"envelope: from <{got.sender}> to {', '.join(got.recipients)}")
        show(f"Subject: {got.message['Subject']}")
        show(f"Received: {' '.join(str(got.message['Received']).split())}")

        step(f"kubectl logs deploy/{name}")
        show(plane.kubectl("logs", "-n", NAMESPACE, f"deploy/{name}", "--tail=5"))

        if args.keep:
            step("The cluster stays up (--keep). To use it:")
            show(f"export KUBECONFIG={plane.kubeconfig}")
            show(f"export PATH={plane.bin_dir}:$PATH")
            show("kubectl get smtprelays,pods -A")
            show("When done: python -m devcluster down")
        else:
            step("Stopping the cluster and restoring the host (address, routes, iptables, …)")
    print(f"\nDemo complete in {time.monotonic() - began:.0f}s.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smtprelay-demo-") as workdir:
        try:
            return run(args, Path(workdir))
        except (RuntimeError, AssertionError, TimeoutError, BuildError, StartError) as error:
            print(f"\ndemo failed: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
