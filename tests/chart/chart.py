"""The chart as tests see it: rendered by Helm's own Go library (helm-python-sdk), parsed.

No helm binary: `helm_python` binds libhelm_c, the C ABI over Helm v4's SDK, so what is
rendered and linted here is what `helm install` would render and lint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "smtprelay-operator"
CUSTOM_VALUES = Path(__file__).with_name("values-custom.yaml")
RELEASE = "smtprelay-operator"
NAMESPACE = "smtprelay-system"

Object = dict[str, Any]


def custom_values() -> dict[str, Any]:
    """Every value set to something other than its default."""
    values: dict[str, Any] = yaml.safe_load(CUSTOM_VALUES.read_text())
    return values


def render_files(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    """Template path (relative to the chart) -> rendered text, as `helm template` makes it."""
    with helm.Chart.load(CHART_DIR) as chart:
        files = chart.render(dict(values or {}), name=release, namespace=namespace, is_install=True)
    prefix = f"{chart_name()}/"
    return {path.removeprefix(prefix): text for path, text in files.items()}


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[Object]:
    """The Kubernetes objects the templates render (NOTES.txt aside), in template order."""
    objects: list[Object] = []
    for path, text in sorted(render_files(values, release=release, namespace=namespace).items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: Mapping[str, Any] | None = None, *, namespace: str = NAMESPACE) -> str:
    return render_files(values, namespace=namespace)["templates/NOTES.txt"]


def chart_name() -> str:
    metadata: Object = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    return str(metadata["name"])


def lint(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`helm lint --strict`: warnings count as errors."""
    return helm.lint(CHART_DIR, dict(values) if values is not None else None, strict=True)


def only(objects: list[Object], kind: str, name: str | None = None) -> Object:
    """The one object of that kind (and name); fails naming what was rendered instead."""
    found = [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {kinds(objects)}"
    return found[0]


def kinds(objects: list[Object]) -> list[tuple[str, str, str | None]]:
    return [
        (obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")) for obj in objects
    ]


def rules(objects: list[Object]) -> Iterator[tuple[Object, Object]]:
    """(role, rule) for every rule of every Role and ClusterRole rendered."""
    for obj in objects:
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj.get("rules") or []:
                yield obj, rule


def container(objects: list[Object]) -> Object:
    deployment = only(objects, "Deployment")
    containers: list[Object] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(objects: list[Object]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(objects).get("env") or []}
