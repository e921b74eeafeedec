"""spec.monitoring turned off: the PodMonitor and PrometheusRule the operator made go away.

prometheus-operator's own CRDs are not part of the test cluster; two minimal CRDs of the
same group, version and kinds stand in for them (the operator only applies, reads and
deletes these objects: the schema it writes is prometheus-operator's business), installed
for this module and removed after it. Reconciles run in this process, as in
test_phases.py, and what they left is read back from the API server.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from smtprelay_operator import pruning, reconcile

from tests.cluster.controlplane import ControlPlane
from tests.operator.support import Cluster, create_relay

pytestmark = pytest.mark.cluster

KINDS = (("PodMonitor", "podmonitors"), ("PrometheusRule", "prometheusrules"))


def _crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def monitoring_crds(control_plane: ControlPlane) -> Iterator[None]:
    names = [f"{plural}.monitoring.coreos.com" for _, plural in KINDS]
    for kind, plural in KINDS:
        subprocess.run(
            [str(control_plane.bin_dir / "kubectl"), "apply", "-f", "-"],
            env=control_plane.env(),
            input=json.dumps(_crd(kind, plural)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names)
    )
    yield
    control_plane.kubectl("delete", "crd", *names, "--wait=true", "--timeout=60s")


def _monitoring(cluster: Cluster, name: str) -> list[bool]:
    return [cluster.get(f"{plural}.monitoring.coreos.com", name) is not None for _, plural in KINDS]


def _settle(context: reconcile.Context, cluster: Cluster, name: str) -> None:
    assert reconcile.reconcile(context, cluster.namespace, name) is not False


@pytest.mark.usefixtures("monitoring_crds")
class TestMonitoringOff:
    def test_turning_monitoring_off_removes_what_it_made(
        self, cluster: Cluster, context: reconcile.Context
    ) -> None:
        """podMonitor and prometheusRule on, then off one at a time: each object goes
        with its switch; the relay's other children stay."""
        create_relay(cluster, "mail", {"monitoring": {"podMonitor": True, "prometheusRule": True}})
        _settle(context, cluster, "mail")
        assert _monitoring(cluster, "mail") == [True, True]

        cluster.patch("smtprelay", "mail", {"spec": {"monitoring": {"prometheusRule": False}}})
        _settle(context, cluster, "mail")
        assert _monitoring(cluster, "mail") == [True, False]

        cluster.patch("smtprelay", "mail", {"spec": {"monitoring": None}})
        _settle(context, cluster, "mail")
        assert _monitoring(cluster, "mail") == [False, False]
        assert cluster.get("deployment", "mail") is not None
        assert cluster.get("configmap", "mail-config") is not None

    def test_an_object_of_the_same_name_it_does_not_own_is_left_alone(
        self, cluster: Cluster, context: reconcile.Context
    ) -> None:
        """A PodMonitor the user made under the relay's name survives the relay's change."""
        create_relay(cluster, "mail")
        _settle(context, cluster, "mail")
        cluster.apply(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PodMonitor",
                "metadata": {"name": "mail", "namespace": cluster.namespace},
                "spec": {"selector": {}},
            }
        )
        cluster.patch("smtprelay", "mail", {"spec": {"delivery": {"tries": 7}}})
        _settle(context, cluster, "mail")
        assert _monitoring(cluster, "mail") == [True, False]


class TestUnwanted:
    def test_the_kinds_not_rendered(self) -> None:
        """Only the optional kinds missing from what was rendered are looked for."""
        assert pruning.unwanted([{"kind": "PodMonitor"}]) == ["PrometheusRule"]
        assert pruning.unwanted([]) == ["PodMonitor", "PrometheusRule"]

    def test_ownership_is_by_uid(self) -> None:
        """An owner reference with another uid is not ownership."""
        obj = {"metadata": {"ownerReferences": [{"uid": "a"}, {"uid": "b"}]}}
        assert pruning.owned_by(obj, "b")
        assert not pruning.owned_by(obj, "c")
        assert not pruning.owned_by({"metadata": {}}, "a")
