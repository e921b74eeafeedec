"""values.schema.json: wrong types and unknown keys are refused, naming the key."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.chart import chart


def _uncommented_keys(text: str) -> list[str]:
    """Keys of values.yaml with no comment above them or above a section holding them."""
    missing: list[str] = []
    sections: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped:
            indent = len(line) - len(line.lstrip())
            while sections and sections[-1][0] >= indent:
                sections.pop()
            commented = previous.startswith("#") or any(flag for _, flag in sections)
            if not commented:
                missing.append(stripped.split(":", 1)[0])
            sections.append((indent, previous.startswith("#")))
        if stripped:
            previous = stripped
    return missing


def _refusal(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values)
    return str(caught.value)


class TestSchema:
    def test_every_default_value_is_described(self) -> None:
        """Each value in values.yaml has a comment (on it or its section) and a schema entry."""
        with helm.Chart.load(chart.CHART_DIR) as loaded:
            properties = (loaded.schema or {})["properties"]
            defaults = loaded.values
        assert set(defaults) <= set(properties)
        assert _uncommented_keys((chart.CHART_DIR / "values.yaml").read_text()) == []

    def test_schema_closes_every_object(self) -> None:
        """additionalProperties is false on every object type with named properties."""
        with helm.Chart.load(chart.CHART_DIR) as loaded:
            schema = loaded.schema
        assert schema is not None

        def walk(node: Any, where: str) -> None:
            if isinstance(node, dict):
                if node.get("type") == "object" and "properties" in node:
                    assert node.get("additionalProperties") is False, where
                for key, child in node.items():
                    walk(child, f"{where}/{key}")
            elif isinstance(node, list):
                for position, child in enumerate(node):
                    walk(child, f"{where}/{position}")

        walk(schema, "")

    @pytest.mark.parametrize(
        ("values", "named"),
        [
            ({"replicaCount": 2}, "replicaCount"),
            ({"image": {"repository": "x", "tga": "1"}}, "tga"),
            ({"rbac": {"scope": "namespaced", "namespaces": ["a"]}}, "namespaces"),
            ({"relays": [{"name": "a", "sepc": {}}]}, "sepc"),
            ({"tolerations": [{"key": "a", "efect": "NoSchedule"}]}, "efect"),
            ({"resources": {"request": {"cpu": "1"}}}, "request"),
            ({"dashboards": {"enable": True}}, "enable"),
        ],
    )
    def test_unknown_keys_are_refused(self, values: dict[str, Any], named: str) -> None:
        """A misspelt or invented key fails the install and the message names it."""
        assert named in _refusal(values)

    @pytest.mark.parametrize(
        ("values", "named"),
        [
            ({"logLevel": 3}, "/logLevel"),
            ({"logLevel": "trace"}, "/logLevel"),
            ({"logFormat": "text"}, "/logFormat"),
            ({"logFormat": True}, "/logFormat"),
            ({"watchNamespaces": "mail"}, "/watchNamespaces"),
            ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
            ({"rbac": {"scope": "everywhere"}}, "/rbac/scope"),
            ({"rbac": {"create": "yes"}}, "/rbac/create"),
            ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
            ({"relayImage": {"repository": "x", "digest": "latest"}}, "/relayImage/digest"),
            ({"livenessPort": "8080"}, "/livenessPort"),
            ({"nodeSelector": {"disk": 1}}, "/nodeSelector/disk"),
            ({"podAnnotations": ["a"]}, "/podAnnotations"),
            ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
            ({"imagePullSecrets": ["regcred"]}, "/imagePullSecrets/0"),
            ({"relays": [{"name": "a", "spec": "x"}]}, "/relays/0/spec"),
            ({"dashboards": {"enabled": "yes"}}, "/dashboards/enabled"),
            ({"dashboards": {"labels": {"grafana_dashboard": 1}}}, "/dashboards/labels"),
            ({"dashboards": {"annotations": []}}, "/dashboards/annotations"),
        ],
    )
    def test_wrong_types_are_refused(self, values: dict[str, Any], named: str) -> None:
        """A value of the wrong type or outside its enum fails, naming its path."""
        assert named in _refusal(values)

    def test_namespaced_scope_needs_namespaces(self) -> None:
        """rbac.scope=namespaced without watchNamespaces is refused, naming watchNamespaces."""
        message = _refusal({"rbac": {"scope": "namespaced"}})
        assert "watchNamespaces" in message
