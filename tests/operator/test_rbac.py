"""The operator needs only these permissions: the least a chart's ClusterRole must grant."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import ServiceAccountKubeconfig
from tests.operator.support import (
    CONVERGE,
    Cluster,
    Operator,
    create_relay,
    running_operator,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.cluster

# No delete verb anywhere: deletion is the garbage collector's job.
OPERATOR_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["smtprelay.dev"],
        "resources": ["smtprelays"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": ["smtprelay.dev"], "resources": ["smtprelays/status"], "verbs": ["patch"]},
    {
        "apiGroups": [""],
        "resources": ["configmaps", "services", "persistentvolumeclaims"],
        "verbs": ["list", "watch", "create", "patch"],
    },
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "get", "patch"]},
    # Only the labels of the Secrets an SmtpRelay names (PartialObjectMetadata).
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {
        "apiGroups": ["monitoring.coreos.com"],
        "resources": ["podmonitors", "prometheusrules"],
        "verbs": ["create", "get", "patch", "delete"],
    },
    # kopf discovers resources and namespaces by watching them.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]


@pytest.fixture
def least_privileged_operator(
    control_plane: ControlPlane,
    cluster: Cluster,
    service_account_kubeconfig: ServiceAccountKubeconfig,
    tmp_path: Path,
) -> Iterator[Operator]:
    """The operator as a ServiceAccount bound to exactly OPERATOR_RULES."""
    name = f"smtprelay-operator-{cluster.namespace}"
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": OPERATOR_RULES,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [
            {"kind": "ServiceAccount", "name": "smtprelay-operator", "namespace": cluster.namespace}
        ],
    }
    for obj in (role, binding):
        result = cluster.apply(obj)
        assert result.returncode == 0, result.stderr
    kubeconfig = service_account_kubeconfig(namespace=cluster.namespace, name="smtprelay-operator")
    account = f"system:serviceaccount:{cluster.namespace}:smtprelay-operator"

    def can(verb: str, resource: str) -> bool:
        kind, _, subresource = resource.partition("/")
        extra = [f"--subresource={subresource}"] if subresource else []
        answer = cluster.kubectl(
            "auth", "can-i", verb, kind, *extra, f"--as={account}", check=False
        )
        return answer.strip() == "yes"

    def granted() -> bool:
        """RBAC reaches the authorizer through an informer: wait until every rule is in.
        (kubectl cannot ask about kinds this cluster does not serve: prometheus-operator's.)"""
        return all(
            can(verb, resource)
            for rule in OPERATOR_RULES
            if rule["apiGroups"] != ["monitoring.coreos.com"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        )

    wait_for(granted, timeout=CONVERGE, what=f"{name} to be in effect")
    try:
        operator = Operator(control_plane, cluster.namespace, tmp_path, kubeconfig=kubeconfig)
        with running_operator(operator) as running:
            yield running
    finally:
        control_plane.kubectl(
            "delete", f"clusterrolebinding/{name}", f"clusterrole/{name}", check=False
        )


def test_operator_works_with_only_the_documented_permissions(
    cluster: Cluster, least_privileged_operator: Operator
) -> None:
    """Create, Ready, drift restore and status all work with OPERATOR_RULES and nothing more."""
    create_relay(cluster, "mail")
    wait_ready(cluster, "mail")
    old_uid = cluster.must_get("deployment", "mail")["metadata"]["uid"]
    cluster.kubectl("delete", "deployment", "mail", "--wait=false")

    def recreated() -> bool:
        deployment = cluster.get("deployment", "mail")
        return deployment is not None and deployment["metadata"]["uid"] != old_uid

    wait_for(recreated, timeout=CONVERGE, what="the Deployment to be recreated")
    wait_ready(cluster, "mail")
    log = least_privileged_operator.log()
    assert "Forbidden" not in log
    assert "status=403" not in log
    events = json.loads(cluster.kubectl("get", "events", "-o", "json"))["items"]
    assert any(event["reason"] == "Applied" for event in events)
