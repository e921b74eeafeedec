"""`helm lint --strict` on the chart, with its defaults and with every value customised."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart import chart

_INFO = 1  # helm lint severities: 1 info, 2 warning, 3 error


def _problems(report: dict[str, Any]) -> list[str]:
    return [
        f"{message['path']}: {message['error']}"
        for message in report["messages"]
        if message["severity"] > _INFO
    ] + list(report["errors"])


class TestLint:
    def test_defaults_pass_strict_lint(self) -> None:
        """The chart as shipped lints clean with warnings treated as errors."""
        report = chart.lint()
        assert report["total_charts_linted"] == 1
        assert _problems(report) == []

    def test_custom_values_pass_strict_lint(self) -> None:
        """A values file that sets every key lints clean too."""
        assert _problems(chart.lint(chart.custom_values())) == []

    @pytest.mark.parametrize(
        "values",
        [
            {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["team-a"]},
            {"watchNamespaces": ["team-a", "team-b"]},
            {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}},
            {"dashboards": {"enabled": True}},
        ],
        ids=["namespaced", "cluster-limited", "bring-your-own-account", "dashboard"],
    )
    def test_other_modes_pass_strict_lint(self, values: dict[str, Any]) -> None:
        """Each supported install mode lints clean."""
        assert _problems(chart.lint(values)) == []

    def test_lint_reports_schema_violations(self) -> None:
        """Lint is not blind: an unknown key is an error in its report."""
        assert any(
            "replicaCount" in problem for problem in _problems(chart.lint({"replicaCount": 2}))
        )
