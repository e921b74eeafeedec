"""The operator at scale, against the real control plane of tests/cluster.

``python -m bench.operator_scale [--relays 200] [--idle-relays 1000] [--idle-seconds 60]``

Starts etcd, kube-apiserver, the controllers, the scheduler and kwok (whose fake node turns
pods Running and Ready), installs the CRD and runs ``smtprelay-operator`` watching one
namespace, as a ServiceAccount bound to cluster-admin: its requests then form their own
flow in the API server's priority and fairness metrics, apart from the bench's (admin) and
the controllers' (kube-system accounts).

1. ``--relays`` SmtpRelays are created at once (each with a pre-bound PersistentVolume, as
   the tests make: there is no provisioner). Watches time, per relay, creation until its
   ConfigMap and Deployment exist (the reconcile latency), until all four objects exist,
   and until its Ready condition is True. Reported: time until every relay has its objects
   and until every one is Ready, latency p50/p99, the operator's peak RSS, and its API
   requests per SmtpRelay (``apiserver_flowcontrol_dispatched_requests_total`` of its flow).
2. More SmtpRelays up to ``--idle-relays`` in all; once every one has its objects and the
   controllers have settled, nothing changes for ``--idle-seconds``: the operator's RSS, CPU
   seconds per minute and API requests per minute over that window.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from smtprelay_operator import api

from bench.procs import TreeSampler, cpu_seconds
from bench.report import machine, revision, table
from devcluster import accounts, build, controlplane
from devcluster.controlplane import ControlPlane
from tests.operator.support import CRD_FILE, Operator

NAMESPACE = "scale-bench"
ACCOUNT = "smtprelay-operator"
_CHILD_KINDS = ("configmaps", "deployments", "services", "persistentvolumeclaims")


@dataclass
class Relay:
    created: float = 0.0
    children: dict[str, float] = field(default_factory=dict)  # kind -> first seen
    ready: float = 0.0

    @property
    def reconciled(self) -> float:
        """Creation until ConfigMap and Deployment exist (0 while they do not)."""
        seen = [self.children.get(kind, 0.0) for kind in ("configmaps", "deployments")]
        return max(seen) - self.created if all(seen) else 0.0


@dataclass
class Result:
    relays: int
    create_seconds: float = 0.0
    objects_seconds: float = 0.0
    ready_seconds: float = 0.0
    ready_count: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    peak_rss_mib: float = 0.0
    cpu_seconds: float = 0.0
    requests: dict[str, float] = field(default_factory=dict)  # verb -> count, operator's flow
    own: dict[str, float] = field(default_factory=dict)  # the operator's own counters, deltas
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # until all Ready
    flows: dict[str, float] = field(default_factory=dict)  # API requests by flow schema
    idle_relays: int = 0
    idle_seconds: float = 0.0
    idle_rss_mib: float = 0.0
    idle_cpu_seconds_per_minute: float = 0.0
    idle_requests_per_minute: float = 0.0
    idle_own: dict[str, float] = field(default_factory=dict)


class Tracker:
    """Watches of the namespace's SmtpRelays and their children, noting when each appears."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._api = api_client
        self.relays: dict[str, Relay] = {}
        self._lock = threading.Lock()
        self._watches: list[watch.Watch] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def relay(self, name: str) -> Relay:
        with self._lock:
            return self.relays.setdefault(name, Relay())

    def _owner(self, kind: str, name: str) -> str:
        if kind == "configmaps":
            return name.removesuffix("-config")
        if kind == "persistentvolumeclaims":
            return name.removesuffix("-spool")
        return name

    def _follow(self, kind: str) -> None:
        core, apps = client.CoreV1Api(self._api), client.AppsV1Api(self._api)
        custom = client.CustomObjectsApi(self._api)
        lister: Any = {
            "configmaps": core.list_namespaced_config_map,
            "services": core.list_namespaced_service,
            "persistentvolumeclaims": core.list_namespaced_persistent_volume_claim,
            "deployments": apps.list_namespaced_deployment,
        }.get(kind)
        stream = watch.Watch()  # type: ignore[no-untyped-call]
        self._watches.append(stream)
        # deserialize=False: the events as parsed JSON, not the client's model objects.
        # Building a V1Deployment for each of a rollout's status events cost the bench more
        # CPU than the API server used, on the 2 CPUs they share with the system measured.
        if lister is None:  # the SmtpRelays themselves: Ready
            events = stream.stream(  # type: ignore[no-untyped-call]
                custom.list_namespaced_custom_object,
                api.GROUP,
                api.VERSION,
                NAMESPACE,
                api.PLURAL,
                timeout_seconds=3600,
                deserialize=False,
            )
        else:
            events = stream.stream(  # type: ignore[no-untyped-call]
                lister, NAMESPACE, timeout_seconds=3600, deserialize=False
            )
        try:
            for event in events:
                self._note(kind, event, lister is None)
        except Exception:
            if not self._stopping:  # the control plane going away ends every watch
                raise

    def _note(self, kind: str, event: Any, is_relay: bool) -> None:
        now = time.monotonic()
        obj = event["object"]
        if is_relay:
            conditions = (obj.get("status") or {}).get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            relay = self.relay(obj["metadata"]["name"])
            if ready and not relay.ready:
                relay.ready = now
        elif event["type"] == "ADDED":
            relay = self.relay(self._owner(kind, obj["metadata"]["name"]))
            relay.children.setdefault(kind, now)

    def start(self) -> None:
        for kind in (*_CHILD_KINDS, "smtprelays"):
            thread = threading.Thread(target=self._follow, args=(kind,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping = True
        for stream in self._watches:
            stream.stop()  # type: ignore[no-untyped-call]


def _metrics(plane: ControlPlane) -> str:
    return plane.kubectl("get", "--raw", "/metrics", timeout=60)


def operator_requests(text: str) -> dict[str, float]:
    """Requests the API server dispatched in the flow schema ``service-accounts``, by
    priority level: it holds every ServiceAccount outside kube-system, and the operator's is
    the only one that makes requests here."""
    total: dict[str, float] = {}
    pattern = re.compile(
        r"^apiserver_flowcontrol_dispatched_requests_total\{([^}]*)\} (\S+)$", re.M
    )
    for match in pattern.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("flow_schema") == "service-accounts":
            level = labels.get("priority_level", "")
            total[level] = total.get(level, 0.0) + float(match.group(2))
    return total


def flows(text: str) -> dict[str, float]:
    """Requests the API server dispatched, by flow schema (who sent them)."""
    total: dict[str, float] = {}
    pattern = re.compile(
        r"^apiserver_flowcontrol_dispatched_requests_total\{([^}]*)\} (\S+)$", re.M
    )
    for match in pattern.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        schema = labels.get("flow_schema", "")
        total[schema] = total.get(schema, 0.0) + float(match.group(2))
    return total


def _cpu(plane: ControlPlane, operator_pid: int) -> dict[str, float]:
    """CPU seconds so far of each control-plane process, the operator and this bench."""
    pids = {**plane.pids, "operator": operator_pid, "bench": os.getpid()}
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def _delta(after: dict[str, float], before: dict[str, float]) -> float:
    return sum(after.values()) - sum(before.values())


_OWN = re.compile(r'^smtprelay_operator_(api_requests|applies)_total\{\w+="(\w+)"\} (\S+)$', re.M)


def own_counters(url: str) -> dict[str, float]:
    """The operator's own /metrics: its API requests by method, its applies by outcome."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 -- loopback
        text = response.read().decode()
    return {f"{kind} {label}": float(value) for kind, label, value in _OWN.findall(text)}


def _deltas(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _nodes(api_client: client.ApiClient, relays: int) -> None:
    """More kwok nodes, so every relay's pod has room (a node takes 110 pods)."""
    core = client.CoreV1Api(api_client)
    for index in range(1, math.ceil(relays / 100)):
        node: Any = copy.deepcopy(controlplane.fake_node())
        name = f"{controlplane.NODE_NAME}-bench-{index}"
        node["metadata"]["name"] = name
        node["metadata"]["labels"]["kubernetes.io/hostname"] = name
        core.create_node(node)


def _setup(plane: ControlPlane, relays: int) -> Path:
    with plane.api_client() as admin:
        _nodes(admin, relays)
    plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    name = f"{api.PLURAL}.{api.GROUP}"
    plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    plane.kubectl("create", "namespace", NAMESPACE)
    kubeconfig = accounts.service_account_kubeconfig(
        plane, namespace=NAMESPACE, name=ACCOUNT, expiration_seconds=7200
    )
    plane.kubectl(
        "create",
        "clusterrolebinding",
        "smtprelay-operator-bench",
        "--clusterrole=cluster-admin",
        f"--serviceaccount={NAMESPACE}:{ACCOUNT}",
    )
    return kubeconfig


def _volumes(api_client: client.ApiClient, names: list[str]) -> None:
    """A pre-bound PersistentVolume for each relay's spool claim (made before the clock runs)."""
    core = client.CoreV1Api(api_client)
    for name in names:
        volume: Any = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"pv-{NAMESPACE}-{name}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/pv-{name}"},  # noqa: S108 -- kwok's fake node
                "claimRef": {"namespace": NAMESPACE, "name": f"{name}-spool"},
            },
        }
        core.create_persistent_volume(volume)


def _create(api_client: client.ApiClient, names: list[str], tracker: Tracker) -> None:
    """The SmtpRelays, as fast as the API takes them."""
    custom = client.CustomObjectsApi(api_client)
    for name in names:
        tracker.relay(name).created = time.monotonic()
        custom.create_namespaced_custom_object(
            api.GROUP,
            api.VERSION,
            NAMESPACE,
            api.PLURAL,
            {
                "apiVersion": f"{api.GROUP}/{api.VERSION}",
                "kind": api.KIND,
                "metadata": {"name": name},
                "spec": {},
            },
        )


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def converge(
    args: argparse.Namespace, plane: ControlPlane, operator: OperatorRun, tracker: Tracker
) -> Result:
    result = Result(relays=args.relays)
    names = [f"relay-{index:04d}" for index in range(args.relays)]
    operator_pid = operator.pid
    text = _metrics(plane)
    before, flows_before = operator_requests(text), flows(text)
    own_before = own_counters(operator.metrics_url)
    cpu_before = cpu_seconds(operator_pid)
    processes_before = _cpu(plane, operator_pid)
    with plane.api_client() as admin, TreeSampler(operator_pid) as sampler:
        _volumes(admin, names)
        begin = time.monotonic()
        _create(admin, names, tracker)
        result.create_seconds = time.monotonic() - begin
        relays = [tracker.relay(name) for name in names]

        def all_objects() -> bool:
            return all(len(r.children) == len(_CHILD_KINDS) for r in relays)

        _wait(all_objects, args.timeout)
        result.objects_seconds = max(max(r.children.values(), default=0) for r in relays) - begin
        _wait(lambda: all(r.ready for r in relays), args.timeout)
        result.ready_count = sum(1 for r in relays if r.ready)
        result.ready_seconds = max(r.ready for r in relays) - begin
        latencies = [r.reconciled * 1000 for r in relays if r.reconciled]
        result.latency_p50_ms = statistics.median(latencies) if latencies else 0.0
        result.latency_p99_ms = _percentile(latencies, 0.99)
        result.cpu_seconds = cpu_seconds(operator_pid) - cpu_before
        result.cpu_by_process = _deltas(_cpu(plane, operator_pid), processes_before)
        text = _metrics(plane)
        if args.keep:  # the API server's own account, for a closer look
            (plane.run_dir / "apiserver-metrics-after-converge.txt").write_text(text)
        result.requests = {"all": _delta(operator_requests(text), before)}
        result.flows = {k: v for k, v in _deltas(flows(text), flows_before).items() if v}
        result.own = _deltas(own_counters(operator.metrics_url), own_before)
    result.peak_rss_mib = sampler.memory.peak_rss_kib / 1024
    return result


def idle(
    args: argparse.Namespace,
    plane: ControlPlane,
    operator: OperatorRun,
    tracker: Tracker,
    result: Result,
) -> None:
    operator_pid = operator.pid
    extra = [f"relay-{index:04d}" for index in range(args.relays, args.idle_relays)]
    with plane.api_client() as admin:
        _volumes(admin, extra)
        _create(admin, extra, tracker)
    everyone = [tracker.relay(f"relay-{index:04d}") for index in range(args.idle_relays)]
    _wait(lambda: all(len(r.children) == len(_CHILD_KINDS) for r in everyone), args.timeout)
    _wait(lambda: all(r.ready for r in everyone), args.timeout)
    time.sleep(args.settle)  # the controllers' and kwok's last status writes die down
    result.idle_relays = len(everyone)
    before = operator_requests(_metrics(plane))
    own_before = own_counters(operator.metrics_url)
    cpu_before = cpu_seconds(operator_pid)
    begin = time.monotonic()
    with TreeSampler(operator_pid, interval=1.0) as sampler:
        time.sleep(args.idle_seconds)  # the measurement window: nothing is changed in it
        sampler.sample()
    seconds = time.monotonic() - begin
    result.idle_seconds = seconds
    result.idle_rss_mib = sampler.memory.last_rss_kib / 1024
    result.idle_cpu_seconds_per_minute = (cpu_seconds(operator_pid) - cpu_before) * 60 / seconds
    requests = _delta(operator_requests(_metrics(plane)), before)
    result.idle_requests_per_minute = requests * 60 / seconds
    result.idle_own = _deltas(own_counters(operator.metrics_url), own_before)


@dataclass
class OperatorRun:
    pid: int
    metrics_url: str


@contextlib.contextmanager
def running(args: argparse.Namespace) -> Iterator[tuple[ControlPlane, OperatorRun]]:
    plane = controlplane.start(bin_dir=build.ensure_built())
    operator = None
    try:
        kubeconfig = _setup(plane, max(args.relays, args.idle_relays))
        log_dir = plane.run_dir / "operator-bench"
        log_dir.mkdir(exist_ok=True)
        # The chart's default log level: kopf's debug log (--verbose) costs CPU per event.
        port = controlplane.free_port()
        operator = Operator(
            plane,
            NAMESPACE,
            log_dir,
            kubeconfig=kubeconfig,
            extra_args=("--relay-config-url=", f"--metrics-listen=127.0.0.1:{port}"),
            verbose=False,
        )
        operator.start()
        assert operator.process is not None
        yield plane, OperatorRun(operator.process.pid, f"http://127.0.0.1:{port}/metrics")
    finally:
        if operator is not None:
            operator.stop()
        plane.stop(keep_run_dir=args.keep)


def _own(counters: dict[str, float], per: int) -> str:
    """``GET 1.0, PATCH 6.0 a relay; applied 5.0, unchanged 2.0`` (per ``per`` relays)."""
    parts = [
        f"{key.split(' ', 1)[1]} {value / per:.1f}"
        for key, value in sorted(counters.items())
        if value
    ]
    return ", ".join(parts) or "none"


def _listing(values: dict[str, float], form: str) -> str:
    ordered = sorted(values.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {form.format(value)}" for name, value in ordered)


def summarise(args: argparse.Namespace, result: Result) -> str:
    per_relay = result.requests.get("all", 0.0) / max(1, result.relays)
    rows = [
        ["SmtpRelays created at once", f"{result.relays} (in {result.create_seconds:.1f} s)"],
        ["until every one has its 4 objects", f"{result.objects_seconds:.1f} s"],
        [
            "until every one is Ready",
            f"{result.ready_seconds:.1f} s ({result.ready_count}/{result.relays} Ready)",
        ],
        [
            "reconcile latency (create → ConfigMap and Deployment)",
            f"p50 {result.latency_p50_ms:.0f} ms, p99 {result.latency_p99_ms:.0f} ms",
        ],
        ["operator peak RSS", f"{result.peak_rss_mib:.0f} MiB"],
        ["operator CPU until all Ready", f"{result.cpu_seconds:.1f} s"],
        ["operator API requests per SmtpRelay", f"{per_relay:.1f}"],
        ["of which its reconciles' own (by method; applies)", _own(result.own, result.relays)],
        ["CPU s until all Ready, by process", _listing(result.cpu_by_process, "{:.1f}")],
        ["API requests until all Ready, by flow schema", _listing(result.flows, "{:.0f}")],
    ]
    if result.idle_relays:
        rows += [
            [
                f"idle: {result.idle_relays} SmtpRelays, {result.idle_seconds:.0f} s window",
                f"RSS {result.idle_rss_mib:.0f} MiB",
            ],
            ["idle: operator CPU", f"{result.idle_cpu_seconds_per_minute:.2f} s a minute"],
            ["idle: operator API requests", f"{result.idle_requests_per_minute:.1f} a minute"],
            ["idle: its reconciles' own, in the window", _own(result.idle_own, 1)],
        ]
    return "\n".join(
        [
            f"operator at scale; {machine()}; operator at {revision()}",
            "",
            table(["what", "measured"], rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_scale", description=__doc__)
    parser.add_argument("--relays", type=int, default=200, help="created at once (200)")
    parser.add_argument(
        "--idle-relays", type=int, default=1000, help="SmtpRelays in all while idle (1000)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=60.0, help="the idle window measured (60 s)"
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="wait before the idle window (10 s)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="limit per phase (600 s)")
    parser.add_argument("--keep", action="store_true", help="keep the control plane's run dir")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if not 1 <= args.relays <= 2000 or not args.relays <= args.idle_relays <= 5000:
        parser.error("--relays must be 1..2000 and --idle-relays relays..5000")
    with running(args) as (plane, operator):
        tracker = Tracker(plane.api_client())
        tracker.start()
        try:
            result = converge(args, plane, operator, tracker)
            print(summarise(args, result), flush=True)
            if args.idle_relays > 0:
                idle(args, plane, operator, tracker, result)
        finally:
            tracker.stop()
    print()
    print(summarise(args, result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0 if result.ready_count == result.relays else 1


if __name__ == "__main__":
    sys.exit(main())
