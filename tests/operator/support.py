"""Helpers for operator tests on the real control plane: kubectl, the operator process.

The operator runs the way it runs in a cluster: the `smtprelay-operator` console script as
a subprocess, with KUBECONFIG pointing at the test cluster.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from smtprelay_operator import api, crd

from tests.cluster import controlplane
from tests.cluster.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / crd.FILE_NAME
TEST_IMAGE = "registry.example/smtprelay:test"
_STOP_TIMEOUT = 15.0
_START_TIMEOUT = 60.0
_LOG_TAIL = 60


class Cluster:
    """kubectl against the test control plane, in one namespace, with JSON out."""

    def __init__(self, plane: ControlPlane, namespace: str) -> None:
        self.plane = plane
        self.namespace = namespace

    def kubectl(self, *args: str, check: bool = True) -> str:
        return self.plane.kubectl("-n", self.namespace, *args, check=check)

    def _apply(self, manifest: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.plane.bin_dir / "kubectl"), *args, "apply", "-f", "-"],
            env=self.plane.env(),
            input=json.dumps(manifest),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def replace(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """`kubectl replace -f -` (the whole object, so removed fields are removed)."""
        return subprocess.run(
            [str(self.plane.bin_dir / "kubectl"), "-n", self.namespace, "replace", "-f", "-"],
            env=self.plane.env(),
            input=json.dumps(manifest),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def apply(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """`kubectl apply -f -`, returning the completed process (a refusal is not raised)."""
        return self._apply(manifest, "-n", self.namespace)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        out = self.plane.kubectl(
            "-n", self.namespace, "get", kind, name, "-o", "json", "--ignore-not-found"
        )
        if not out.strip():
            return None
        obj: dict[str, Any] = json.loads(out)
        return obj

    def must_get(self, kind: str, name: str) -> dict[str, Any]:
        obj = self.get(kind, name)
        assert obj is not None, f"{kind}/{name} does not exist in {self.namespace}"
        return obj

    def list(self, kind: str, selector: str) -> list[dict[str, Any]]:
        out = self.plane.kubectl("-n", self.namespace, "get", kind, "-l", selector, "-o", "json")
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    def patch(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        self.kubectl("patch", kind, name, "--type=merge", "-p", json.dumps(patch))

    def spool_volume(self, relay: str) -> str:
        """A PersistentVolume pre-bound to `<relay>-spool`; the test cluster has no provisioner."""
        name = f"pv-{self.namespace}-{relay}"
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {"smtprelay.test/namespace": self.namespace}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/{name}"},  # noqa: S108 - a path on kwok's fake node
                "claimRef": {"namespace": self.namespace, "name": f"{relay}-spool"},
            },
        }
        result = self._apply(volume)
        assert result.returncode == 0, result.stderr
        return name


def wait_for(condition: Any, *, timeout: float, what: str) -> None:
    controlplane.wait_for(condition, timeout=timeout, what=what, interval=0.25)


def spawn_operator(
    argv: list[str], *, env: dict[str, str], log_path: Path, port: int
) -> subprocess.Popen[bytes]:
    """Start `smtprelay-operator` and wait for its liveness endpoint on ``port``."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def live() -> bool:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL:])
            raise RuntimeError(f"operator exited with {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_for(live, timeout=_START_TIMEOUT, what="the operator's liveness endpoint")
    return process


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, as the kubelet does; SIGKILL if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Operator:
    """`smtprelay-operator` as a subprocess; start, stop (SIGTERM) and read its log."""

    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        log_dir: Path,
        *,
        kubeconfig: Path | None = None,
        extra_args: tuple[str, ...] = ("--relay-config-url=",),
        verbose: bool = True,
    ) -> None:
        """``extra_args``: by default the operator does not ask relays for their running
        config (kwok's pods run nothing); a test with a relay process gives its URL.
        ``verbose``: kopf's progress in the log (tests); off, the log level of the chart's
        default (benchmarks)."""
        self.extra_args = extra_args
        self.verbose = verbose
        self.plane = plane
        self.namespace = namespace
        self.log_dir = log_dir
        self.kubeconfig = kubeconfig or plane.kubeconfig
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / "operator-0.log"
        self.starts = 0

    def start(self) -> None:
        assert self.process is None, "already running"
        port = controlplane.free_port()
        self.log_path = self.log_dir / f"operator-{self.starts}.log"
        self.starts += 1
        env = self.plane.env()
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["SMTPRELAY_RELAY_IMAGE"] = TEST_IMAGE
        executable = Path(sys.executable).parent / "smtprelay-operator"
        self.process = spawn_operator(
            [
                str(executable),
                "--namespace",
                self.namespace,
                f"--liveness=http://127.0.0.1:{port}/healthz",
                *(["--verbose"] if self.verbose else []),
                *self.extra_args,
            ],
            env=env,
            log_path=self.log_path,
            port=port,
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self) -> str:
        return "\n".join(self.log().splitlines()[-_LOG_TAIL:])


@contextlib.contextmanager
def running_operator(running: Operator) -> Iterator[Operator]:
    """Start, yield, stop; the logs' tails go to stdout, which pytest shows on failure."""
    running.start()
    try:
        yield running
    finally:
        running.stop()
        for path in sorted(running.log_dir.glob("operator-*.log")):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-_LOG_TAIL:])
            sys.stdout.write(f"----- {path.name} (tail) -----\n{tail}\n")


def relay_manifest(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": spec or {},
    }


CONVERGE = 60.0  # seconds for the operator and the controllers to settle
CHILDREN = (
    ("configmap", "{}-config"),
    ("deployment", "{}"),
    ("persistentvolumeclaim", "{}-spool"),
    ("service", "{}"),
    ("service", "{}-metrics"),
)


def condition(relay: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (relay.get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            found: dict[str, Any] = item
            return found
    return {}


def relay_yaml(cluster: Cluster, name: str) -> dict[str, Any]:
    text = cluster.must_get("configmap", f"{name}-config")["data"]["relay.yaml"]
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def template_hash(cluster: Cluster, name: str) -> str:
    """The pod template's restart hash: it changes only when the pod must roll."""
    deployment = cluster.must_get("deployment", name)
    return str(
        deployment["spec"]["template"]["metadata"]["annotations"][api.RESTART_HASH_ANNOTATION]
    )


def create_relay(cluster: Cluster, name: str, spec: dict[str, Any] | None = None) -> None:
    cluster.spool_volume(name)
    result = cluster.apply(relay_manifest(name, spec))
    assert result.returncode == 0, result.stderr


def wait_ready(cluster: Cluster, name: str) -> dict[str, Any]:
    cluster.kubectl(
        "wait", "--for=condition=Ready", f"smtprelay/{name}", f"--timeout={CONVERGE:.0f}s"
    )
    return cluster.must_get("smtprelay", name)


def exists(cluster: Cluster, kind: str, name: str) -> bool:
    return cluster.get(kind, name) is not None


@contextlib.contextmanager
def refusing(
    cluster: Cluster, *, resource: str, expression: str, message: str, probe: dict[str, Any]
) -> Iterator[None]:
    """The API server refuses CREATE/UPDATE of ``resource`` (core v1) in the test namespace
    where the CEL ``expression`` is false: a real admission failure (a ValidatingAdmission-
    Policy), such as a webhook or a quota would give, while the test needs one. ``probe`` is
    an object the policy refuses: its server-side dry run tells when the policy is in force."""
    name = f"refuse-{cluster.namespace}-{resource}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}
                },
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": [resource],
                    }
                ],
            },
            "validations": [{"expression": expression, "message": message}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    for manifest in (policy, binding):
        result = cluster._apply(manifest)
        assert result.returncode == 0, result.stderr

    def in_force() -> bool:
        return cluster._apply(probe, "-n", cluster.namespace, "--dry-run=server").returncode != 0

    wait_for(in_force, timeout=CONVERGE, what=f"the policy refusing {resource} to be in force")
    try:
        yield
    finally:
        cluster.plane.kubectl(
            "delete",
            "validatingadmissionpolicybinding/" + name,
            "validatingadmissionpolicy/" + name,
            "--wait=true",
        )


def events(cluster: Cluster, relay: str) -> list[dict[str, Any]]:
    """The Events about SmtpRelay ``relay``."""
    out = cluster.kubectl(
        "get",
        "events",
        "--field-selector",
        f"involvedObject.kind=SmtpRelay,involvedObject.name={relay}",
        "-o",
        "json",
    )
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items
