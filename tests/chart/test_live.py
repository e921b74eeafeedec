"""The chart on a real API server: it applies cleanly and its RBAC is enough for the operator.

Proof by use: the operator runs with a token for the chart's ServiceAccount (not the admin)
and must take an SmtpRelay all the way to Ready and put back children deleted under it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from kubernetes import client

from tests.chart import chart, live
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import ServiceAccountKubeconfig

pytestmark = pytest.mark.cluster

CONVERGE = 90.0  # seconds for the operator, the controllers and kwok to settle
RELAY = "mail"


@pytest.fixture
def other_namespace(kube_api: client.ApiClient) -> Iterator[str]:
    """A second namespace: the one a namespaced operator serves, apart from its own."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)


class Installed:
    """One rendering of the chart, applied, with its operator running as its account."""

    def __init__(self, plane: ControlPlane, objects: list[chart.Object], operator: live.Operator):
        self.plane = plane
        self.objects = objects
        self.operator = operator
        self.account = chart.only(objects, "ServiceAccount")["metadata"]
        self.cleanup: list[chart.Object] = [
            obj for obj in objects if obj["kind"] in ("ClusterRole", "ClusterRoleBinding")
        ]

    @property
    def account_id(self) -> str:
        return f"{self.account['namespace']}:{self.account['name']}"


@contextlib.contextmanager
def installed(
    plane: ControlPlane,
    make_kubeconfig: ServiceAccountKubeconfig,
    tmp_path: Path,
    *,
    namespace: str,
    values: dict[str, Any],
) -> Iterator[Installed]:
    """Render with `values` into `namespace`, apply CRD then objects, start the operator."""
    release = f"r-{namespace}"
    objects = chart.render(values, release=release, namespace=namespace)
    live.install_crd(plane)
    for obj in objects:
        live.apply(plane, obj)
    account = chart.only(objects, "ServiceAccount")["metadata"]
    kubeconfig = make_kubeconfig(namespace=account["namespace"], name=account["name"])
    operator = live.Operator(
        plane,
        container=chart.container(objects),
        kubeconfig=kubeconfig,
        log_path=tmp_path / "operator.log",
    )
    here = Installed(plane, objects, operator)
    try:
        operator.start()
        yield here
    finally:
        operator.stop()
        live.delete_cluster_objects(plane, here.cleanup)
        sys.stdout.write(f"----- operator log (tail) -----\n{operator.tail()}\n")


def reconcile_fully(here: Installed, namespace: str, *, ready_within: float = CONVERGE) -> None:
    """An SmtpRelay becomes Ready, and deleted children come back: every RBAC rule at work."""
    plane = here.plane
    volume = live.spool_volume(plane, namespace=namespace, relay=RELAY)
    here.cleanup.append({"kind": "PersistentVolume", "metadata": {"name": volume}})
    live.apply(
        plane,
        {
            "apiVersion": "smtprelay.dev/v1alpha1",
            "kind": "SmtpRelay",
            "metadata": {"name": RELAY, "namespace": namespace},
            "spec": {"defaultMailHost": "mail.example.com"},
        },
    )
    plane.kubectl(
        "-n",
        namespace,
        "wait",
        "--for=condition=Ready",
        f"smtprelay/{RELAY}",
        f"--timeout={ready_within:.0f}s",
    )
    relay = live.get(plane, "smtprelay", RELAY, namespace)
    assert relay is not None
    assert relay["status"]["observedGeneration"] == relay["metadata"]["generation"]
    assert relay["status"]["readyReplicas"] == 1
    for kind, name in (
        ("configmap", f"{RELAY}-config"),
        ("persistentvolumeclaim", f"{RELAY}-spool"),
        ("service", RELAY),
        ("deployment", RELAY),
    ):
        assert live.get(plane, kind, name, namespace) is not None, f"{kind}/{name} missing"

    for kind, name in (("configmap", f"{RELAY}-config"), ("deployment", RELAY)):
        before = live.get(plane, kind, name, namespace)
        assert before is not None
        plane.kubectl("-n", namespace, "delete", kind, name, "--wait=true")

        def restored(
            kind: str = kind, name: str = name, uid: str = before["metadata"]["uid"]
        ) -> bool:
            after = live.get(plane, kind, name, namespace)
            return after is not None and after["metadata"]["uid"] != uid

        live.wait_for(restored, timeout=CONVERGE, what=f"{kind}/{name} to be put back")

    plane.kubectl(
        "-n",
        namespace,
        "wait",
        "--for=condition=Ready",
        f"smtprelay/{RELAY}",
        f"--timeout={CONVERGE:.0f}s",
    )
    events = plane.kubectl(
        "-n", namespace, "get", "events", f"--field-selector=involvedObject.name={RELAY}"
    )
    assert "Applied" in events, "the operator could not post its Events"


class TestClusterScope:
    def test_default_install_reconciles_as_its_service_account(
        self,
        control_plane: ControlPlane,
        kube_namespace: str,
        service_account_kubeconfig: ServiceAccountKubeconfig,
        tmp_path: Path,
    ) -> None:
        """Default values, cluster-wide: Ready and drift correction, with no request refused."""
        with installed(
            control_plane,
            service_account_kubeconfig,
            tmp_path,
            namespace=kube_namespace,
            values={"logLevel": "verbose"},
        ) as here:
            reconcile_fully(here, kube_namespace)
            assert here.operator.denials(here.account_id) == []
            assert here.operator.fallbacks() == []

    def test_install_limited_to_namespaces_reconciles(
        self,
        control_plane: ControlPlane,
        kube_namespace: str,
        service_account_kubeconfig: ServiceAccountKubeconfig,
        tmp_path: Path,
    ) -> None:
        """ClusterRole but watchNamespaces set: kopf follows namespaces too, none refused."""
        with installed(
            control_plane,
            service_account_kubeconfig,
            tmp_path,
            namespace=kube_namespace,
            values={"logLevel": "verbose", "watchNamespaces": [kube_namespace]},
        ) as here:
            assert here.operator.argv()[1] == f"--namespace={kube_namespace}"
            reconcile_fully(here, kube_namespace)
            assert here.operator.denials(here.account_id) == []
            assert here.operator.fallbacks() == []


NAMESPACED_FALLBACKS = {
    "list namespaces",
    "watch namespaces",
    "list customresourcedefinitions",
    "watch customresourcedefinitions",
}


class TestNamespacedScope:
    def test_namespaced_install_reconciles_with_roles_only(
        self,
        control_plane: ControlPlane,
        kube_namespace: str,
        other_namespace: str,
        service_account_kubeconfig: ServiceAccountKubeconfig,
        tmp_path: Path,
    ) -> None:
        """Roles in the watched namespace only: the operator still takes its relay to Ready."""
        values = {
            "logLevel": "verbose",
            "rbac": {"scope": "namespaced"},
            "watchNamespaces": [other_namespace],
        }
        with installed(
            control_plane,
            service_account_kubeconfig,
            tmp_path,
            namespace=kube_namespace,
            values=values,
        ) as here:
            assert not [obj for obj in here.objects if obj["kind"].startswith("Cluster")]
            reconcile_fully(here, other_namespace)
            # Without cluster-scoped rights kopf goes without its namespace and CRD
            # observers (and says so); nothing else may be refused.
            assert set(here.operator.denials(here.account_id)) <= NAMESPACED_FALLBACKS

    def test_namespaced_install_serves_at_once(
        self,
        control_plane: ControlPlane,
        kube_namespace: str,
        other_namespace: str,
        service_account_kubeconfig: ServiceAccountKubeconfig,
        tmp_path: Path,
    ) -> None:
        """With Roles only, the operator asks for nothing cluster-scoped and is Ready fast."""
        values = {
            "logLevel": "verbose",
            "rbac": {"scope": "namespaced"},
            "watchNamespaces": [other_namespace],
        }
        with installed(
            control_plane,
            service_account_kubeconfig,
            tmp_path,
            namespace=kube_namespace,
            values=values,
        ) as here:
            reconcile_fully(here, other_namespace, ready_within=20)
            assert here.operator.denials(here.account_id) == []


class TestHelmInstall:
    def test_helm_install_and_uninstall(
        self, control_plane: ControlPlane, kube_namespace: str
    ) -> None:
        """Helm's own install (CRD from crds/, then templates, the dashboard too) deploys;
        uninstall cleans up."""
        release = f"h-{kube_namespace}"
        values = {
            "relays": [{"name": RELAY, "spec": {"defaultMailHost": "mail.example.com"}}],
            "dashboards": {"enabled": True},
        }
        with helm.Config(kubeconfig_path=control_plane.kubeconfig, namespace=kube_namespace) as cfg:
            try:
                result = cfg.install(
                    chart.CHART_DIR,
                    release,
                    values,
                    namespace=kube_namespace,
                    wait="watcher",
                    timeout=120,
                )
                assert result["status"] == "deployed"
                assert "--for=condition=Ready smtprelay/mail" in result["notes"]
                assert f"{kube_namespace}/{RELAY}" in result["notes"]
                fullname = f"{release}-smtprelay-operator"
                assert live.get(control_plane, "deployment", fullname, kube_namespace) is not None
                assert live.get(control_plane, "smtprelay", RELAY, kube_namespace) is not None
                dashboard = live.get(
                    control_plane, "configmap", f"{fullname}-dashboard", kube_namespace
                )
                assert dashboard is not None
                assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
                assert control_plane.kubectl("get", "clusterrole", fullname, "-o", "name").strip()
            finally:
                cfg.uninstall(release, ignore_not_found=True, wait="watcher", timeout=120)
        gone = control_plane.kubectl("get", "clusterrole", "-o", "name")
        assert f"clusterrole.rbac.authorization.k8s.io/{release}-smtprelay-operator" not in gone


class TestLogWatch:
    def test_refusals_are_seen_in_the_charts_log_format(
        self,
        control_plane: ControlPlane,
        kube_namespace: str,
        service_account_kubeconfig: ServiceAccountKubeconfig,
        tmp_path: Path,
    ) -> None:
        """The log checks above are not blind: with the chart's JSON log lines and no RBAC at
        all, the operator's refused requests are read from its log."""
        with installed(
            control_plane,
            service_account_kubeconfig,
            tmp_path,
            namespace=kube_namespace,
            values={"logLevel": "verbose", "rbac": {"create": False}},
        ) as here:
            assert "--log-format=json" in here.operator.argv()

            watched = {"list smtprelays", "list configmaps", "list deployments"}

            def refused() -> bool:
                return watched <= set(here.operator.denials(here.account_id))

            live.wait_for(refused, timeout=CONVERGE, what=f"refusals of {sorted(watched)}")
            lines = here.operator.log().splitlines()
            assert lines
            for line in lines:
                record = json.loads(line)
                assert {"message", "severity", "timestamp"} <= record.keys(), line
