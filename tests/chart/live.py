"""The chart on the real control plane: apply what it renders, run the operator as its account.

The operator runs as a subprocess (no container runtime in the test cluster) with exactly the
command, args and env the chart's Deployment gives its container, and with a token for the
chart's ServiceAccount instead of the admin's, so anything its RBAC forgot shows up as a
403 in its log and a relay that never becomes Ready.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.chart import chart
from tests.cluster import controlplane
from tests.cluster.controlplane import ControlPlane
from tests.operator.support import spawn_operator, stop_process

FIELD_MANAGER = "helm"
CRD_NAME = "smtprelays.smtprelay.dev"
_LOG_TAIL = 80
# RBAC's own wording for a denied request, as the API server returns it.
_DENIED = re.compile(
    r'User \\?"system:serviceaccount:(?P<account>[^"\\]+)\\?" cannot (?P<verb>\w+) '
    r'resource \\?"(?P<resource>[^"\\]+)\\?"'
)
# kopf's wording when it falls back for want of cluster-scoped rights (observation.py).
_KOPF_FALLBACK = re.compile(r"Not enough permissions to (?:list|watch) (?:for )?(?P<what>\w+)")


def wait_for(condition: Any, *, timeout: float, what: str) -> None:
    controlplane.wait_for(condition, timeout=timeout, what=what, interval=0.25)


def apply(plane: ControlPlane, obj: chart.Object) -> None:
    """Server-side apply as admin, the way `helm install` (or Argo CD) would create it."""
    result = subprocess.run(
        [
            str(plane.bin_dir / "kubectl"),
            "apply",
            "--server-side",
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
        ],
        env=plane.env(),
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    what = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
    assert result.returncode == 0, f"applying {what}: {result.stderr}"


def install_crd(plane: ControlPlane) -> None:
    """The chart's crds/ first, as Helm does, and wait until SmtpRelays are served."""
    for path in sorted((chart.CHART_DIR / "crds").glob("*.yaml")):
        plane.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(path))
    plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")

    def served() -> bool:
        listing = subprocess.run(
            [str(plane.bin_dir / "kubectl"), "get", "smtprelays", "-A"],
            env=plane.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return listing.returncode == 0

    wait_for(served, timeout=60, what="SmtpRelays to be served")


def get(plane: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    out = plane.kubectl("-n", namespace, "get", kind, name, "-o", "json", "--ignore-not-found")
    if not out.strip():
        return None
    obj: dict[str, Any] = json.loads(out)
    return obj


def spool_volume(plane: ControlPlane, *, namespace: str, relay: str) -> str:
    """A PersistentVolume pre-bound to `<relay>-spool`: the test cluster has no provisioner."""
    name = f"pv-{namespace}-{relay}"
    apply(
        plane,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/{name}"},  # noqa: S108 - on kwok's fake node
                "claimRef": {"namespace": namespace, "name": f"{relay}-spool"},
            },
        },
    )
    return name


def condition(relay: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (relay.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            found: dict[str, Any] = item
            return found
    return {}


class Operator:
    """The chart's operator container, run as a local process under the chart's identity."""

    def __init__(
        self, plane: ControlPlane, *, container: chart.Object, kubeconfig: Path, log_path: Path
    ) -> None:
        self.plane = plane
        self.container = container
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.port = controlplane.free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The container's command and args; only the liveness and metrics addresses move
        to free loopback ports."""
        command = list(self.container["command"])
        executable = Path(sys.executable).parent / command[0]
        moved = {
            "--liveness=": f"--liveness=http://127.0.0.1:{self.port}/healthz",
            "--metrics-listen=": f"--metrics-listen=127.0.0.1:{controlplane.free_port()}",
        }
        args = [
            next((new for prefix, new in moved.items() if arg.startswith(prefix)), arg)
            for arg in self.container.get("args") or []
        ]
        return [str(executable), *command[1:], *args]

    def environment(self) -> dict[str, str]:
        env = self.plane.env()
        for item in self.container.get("env") or []:
            env[item["name"]] = item["value"]
        env["KUBECONFIG"] = str(self.kubeconfig)  # the ServiceAccount, not the admin
        # kwok's pods run no relay: nothing to ask for its running config (Ready follows
        # the pod). The relay-side answer is tested with a real relay in tests/e2e.
        env["SMTPRELAY_RELAY_CONFIG_URL"] = ""
        return env

    def start(self) -> None:
        self.process = spawn_operator(
            self.argv(), env=self.environment(), log_path=self.log_path, port=self.port
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self) -> str:
        return "\n".join(self.log().splitlines()[-_LOG_TAIL:])

    def denials(self, account: str) -> list[str]:
        """`verb resource` for each request RBAC refused this account, as the log reports it."""
        return sorted(
            {
                f"{match['verb']} {match['resource']}"
                for match in _DENIED.finditer(self.log())
                if match["account"] == account
            }
        )

    def fallbacks(self) -> list[str]:
        """What kopf went without for want of cluster-scoped rights (namespaces, resources)."""
        return sorted({match["what"] for match in _KOPF_FALLBACK.finditer(self.log())})


def delete_cluster_objects(plane: ControlPlane, objects: Iterable[chart.Object]) -> None:
    """Remove what has no namespace to be deleted with (ClusterRole and binding, PVs)."""
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "PersistentVolume"):
            plane.kubectl(
                "delete",
                obj["kind"].lower(),
                obj["metadata"]["name"],
                "--ignore-not-found",
                "--wait=false",
                check=False,
            )
