"""The RBAC rules: exact resources and verbs, never a wildcard, the same in every mode."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart import chart

RENDERINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cluster-limited": {"watchNamespaces": ["team-a"]},
    "namespaced": {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["team-a", "team-b"]},
    "custom": chart.custom_values(),
}

# (apiGroup, resource) -> verbs: every right the operator gets in a namespace it serves.
NAMESPACED_RIGHTS = {
    ("smtprelay.dev", "smtprelays"): {"get", "list", "watch"},
    ("smtprelay.dev", "smtprelays/status"): {"patch"},
    ("smtprelay.dev", "smtprelays/finalizers"): {"update"},
    ("", "configmaps"): {"list", "watch", "create", "patch"},
    ("", "persistentvolumeclaims"): {"list", "watch", "create", "patch"},
    ("", "services"): {"list", "watch", "create", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("", "events"): {"create", "get", "patch"},
    ("", "secrets"): {"get"},
    ("monitoring.coreos.com", "podmonitors"): {"create", "get", "patch", "delete"},
    ("monitoring.coreos.com", "prometheusrules"): {"create", "get", "patch", "delete"},
}
CLUSTER_RIGHTS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
# kopf follows namespaces only when it serves a list of them (not cluster-wide).
NAMESPACE_RIGHTS = {("", "namespaces"): {"list", "watch"}}


def rights(role: chart.Object) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


class TestRules:
    @pytest.mark.parametrize("values", RENDERINGS.values(), ids=RENDERINGS.keys())
    def test_no_wildcards(self, values: dict[str, Any]) -> None:
        """No `*` in apiGroups, resources, verbs or resourceNames, in any rendering."""
        found = list(chart.rules(chart.render(values)))
        assert found, "no rules rendered"
        for role, rule in found:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                for item in rule.get(field) or []:
                    assert "*" not in item, f"{role['kind']} {role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule

    def test_cluster_role_grants_exactly_what_the_operator_calls(self) -> None:
        """The ClusterRole is the namespaced rights plus list/watch on CRDs, nothing more."""
        role = chart.only(chart.render(), "ClusterRole")
        assert rights(role) == NAMESPACED_RIGHTS | CLUSTER_RIGHTS

    def test_limited_cluster_role_may_follow_namespaces(self) -> None:
        """Cluster scope limited to watchNamespaces adds list/watch on namespaces, for kopf."""
        role = chart.only(chart.render(RENDERINGS["cluster-limited"]), "ClusterRole")
        assert rights(role) == NAMESPACED_RIGHTS | CLUSTER_RIGHTS | NAMESPACE_RIGHTS

    def test_roles_grant_the_namespaced_rights(self) -> None:
        """Each Role in namespaced mode grants the same rights, less the cluster-scoped ones."""
        objects = chart.render(RENDERINGS["namespaced"])
        roles = [obj for obj in objects if obj["kind"] == "Role"]
        assert len(roles) == 2
        for role in roles:
            assert rights(role) == NAMESPACED_RIGHTS

    def test_secrets_get_only_and_no_deletes(self) -> None:
        """Secrets: get only (the labels of a named one, as metadata), never list or watch;
        the operator deletes nothing (the GC removes children) but the PodMonitor and
        PrometheusRule an SmtpRelay stops asking for, and never a collection."""
        for values in RENDERINGS.values():
            for _, rule in chart.rules(chart.render(values)):
                if "secrets" in rule["resources"]:
                    assert rule["resources"] == ["secrets"]
                    assert rule["verbs"] == ["get"]
                assert not {"deletecollection", "update"} & set(rule["verbs"]) or (
                    rule["resources"] == ["smtprelays/finalizers"]
                )
                assert "delete" not in rule["verbs"] or rule["resources"] == [
                    "podmonitors",
                    "prometheusrules",
                ]

    def test_every_rule_is_explained(self) -> None:
        """Each rule in the template carries a comment saying which code path needs it."""
        text = (chart.CHART_DIR / "templates" / "_rbac.tpl").read_text()
        lines = text.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("- apiGroups:"):
                assert lines[index - 1].startswith("#"), f"rule without a comment: {line}"
