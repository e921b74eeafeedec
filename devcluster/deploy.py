"""Putting the product on the local cluster: the chart, SmtpRelays, and looking at them.

What `make demo` does step by step and tests/e2e asserts on: `helm install` of the chart
(Helm's own Go library, via helm-python-sdk), `kubectl apply` of an SmtpRelay, waiting for
conditions, and the relay's Service address.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from devcluster.controlplane import ControlPlane, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "smtprelay-operator"
CRD = "smtprelays.smtprelay.dev"
OPERATOR_NAMESPACE = "smtprelay-system"
RELEASE = "smtprelay"


def install_chart(
    plane: ControlPlane,
    *,
    release: str = RELEASE,
    namespace: str = OPERATOR_NAMESPACE,
    values: dict[str, Any] | None = None,
    timeout: int = 180,
) -> dict[str, Any]:
    """`helm install --create-namespace --wait`: CRD, RBAC, the operator Deployment Ready."""
    import helm_python as helm  # deferred: loads Helm's shared library

    plane.kubectl("create", "namespace", namespace, check=False)
    with helm.Config(kubeconfig_path=plane.kubeconfig, namespace=namespace) as config:
        result: dict[str, Any] = config.install(
            CHART_DIR, release, values or {}, namespace=namespace, wait="watcher", timeout=timeout
        )
    return result


def uninstall_chart(
    plane: ControlPlane, *, release: str = RELEASE, namespace: str = OPERATOR_NAMESPACE
) -> None:
    import helm_python as helm

    with helm.Config(kubeconfig_path=plane.kubeconfig, namespace=namespace) as config:
        config.uninstall(release, ignore_not_found=True, wait="watcher", timeout=120)


def apply(plane: ControlPlane, manifest: dict[str, Any]) -> str:
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


def get(plane: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    out = plane.kubectl("-n", namespace, "get", kind, name, "-o", "json", "--ignore-not-found")
    if not out.strip():
        return None
    found: dict[str, Any] = json.loads(out)
    return found


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            found: dict[str, Any] = item
            return found
    return {}


def is_true(obj: dict[str, Any] | None, kind: str) -> bool:
    return condition(obj, kind).get("status") == "True"


def relay_pods(plane: ControlPlane, relay: str, namespace: str) -> list[dict[str, Any]]:
    out = plane.kubectl(
        "-n", namespace, "get", "pods", "-l", f"app.kubernetes.io/instance={relay}", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return [pod for pod in items if not pod["metadata"].get("deletionTimestamp")]


def ready_pod(plane: ControlPlane, relay: str, namespace: str) -> dict[str, Any] | None:
    """The relay's one pod once the kubelet reports it Ready (its readiness probe passed)."""
    pods = [pod for pod in relay_pods(plane, relay, namespace) if is_true(pod, "Ready")]
    return pods[0] if len(pods) == 1 else None


def wait_relay_ready(plane: ControlPlane, relay: str, namespace: str, timeout: float) -> None:
    wait_for(
        lambda: is_true(get(plane, "smtprelay", relay, namespace), "Ready"),
        timeout=timeout,
        what=f"smtprelay/{relay} to be Ready",
        interval=0.5,
    )


def service_ip(plane: ControlPlane, relay: str, namespace: str) -> str:
    service = get(plane, "service", relay, namespace)
    assert service is not None, f"service {namespace}/{relay} missing"
    return str(service["spec"]["clusterIP"])
