"""The Argo CD health check in the chart README, run in a Lua interpreter (lupa) against
statuses the operator's own `status.compute` writes."""

from __future__ import annotations

import re
from typing import Any

import lupa
import pytest
from smtprelay_operator import api, status

from tests.chart import chart

T0 = "2026-01-01T00:00:00Z"


def _health_script() -> str:
    text = (chart.CHART_DIR / "README.md").read_text()
    block = re.search(
        r"resource\.customizations\.health\.smtprelay\.dev_SmtpRelay: \|\n(?P<body>(?: {4}.*\n)+)",
        text,
    )
    assert block is not None, "the README's Argo CD health check"
    return "\n".join(line[4:] for line in block.group("body").splitlines())


def _health(obj: dict[str, Any]) -> tuple[str, str]:
    """What Argo CD would show: the script runs with the object as the global ``obj``."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _lua(runtime, obj)
    result = runtime.execute(_health_script())
    return str(result["status"]), str(result["message"])


def _lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({key: _lua(runtime, item) for key, item in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_lua(runtime, item) for item in value])
    return value


def _deployment(*, available: int = 1, restart_hash: str = "r") -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {
            "replicas": 1,
            "template": {"metadata": {"annotations": {api.RESTART_HASH_ANNOTATION: restart_hash}}},
        },
        "status": {
            "observedGeneration": 1,
            "updatedReplicas": 1,
            "replicas": 1,
            "availableReplicas": available,
            "readyReplicas": available,
        },
    }


def _relay(observed: status.Observed, *, generation: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "mail", "namespace": "mail", "generation": generation},
        "status": status.compute(observed, previous=[], now=T0),
    }


def _observed(**facts: Any) -> status.Observed:
    base: dict[str, Any] = {
        "generation": 2,
        "config_hash": "c",
        "restart_hash": "r",
        "deployment": _deployment(),
        "running": status.Running(hash="c"),
    }
    return status.Observed(**{**base, **facts})


CASES = [
    pytest.param(_observed(), "Healthy", id="running-this-generation"),
    pytest.param(_observed(running=status.Running(hash="old")), "Progressing", id="config-pending"),
    pytest.param(
        _observed(deployment=_deployment(restart_hash="old")), "Progressing", id="rolling"
    ),
    pytest.param(
        _observed(failure=status.Failure(reason="InvalidConfig", message="x: bad", stalled=True)),
        "Degraded",
        id="stalled",
    ),
    pytest.param(
        _observed(failure=status.Failure(reason="ApplyFailed", message="timeout")),
        "Progressing",
        id="retrying",
    ),
]


class TestArgoHealth:
    @pytest.mark.parametrize(("observed", "expected"), CASES)
    def test_health_follows_the_status(self, observed: status.Observed, expected: str) -> None:
        """Healthy only when the relay runs the generation; Degraded when Stalled."""
        assert _health(_relay(observed))[0] == expected

    def test_status_of_an_older_generation_is_progressing(self) -> None:
        """A spec the operator has not seen yet is never Healthy, whatever the conditions."""
        health, message = _health(_relay(_observed(), generation=3))
        assert health == "Progressing"
        assert "generation 3" in message

    def test_stalled_message_names_the_reason(self) -> None:
        """The message Argo CD shows carries the reason and the field."""
        failure = status.Failure(
            reason="SecretNotAllowed", message="spec.tls.secretName: no", stalled=True
        )
        assert _health(_relay(_observed(failure=failure))) == (
            "Degraded",
            "SecretNotAllowed: spec.tls.secretName: no",
        )

    def test_no_status_yet(self) -> None:
        """A new SmtpRelay without status is Progressing."""
        relay = {"metadata": {"name": "mail", "generation": 1}}
        assert _health(relay)[0] == "Progressing"
