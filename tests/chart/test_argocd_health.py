"""The Argo CD health check in the chart README, run in a Lua interpreter (lupa) against
statuses the operator's own `status.compute` writes."""

from __future__ import annotations

import re
from typing import Any

import lupa
import pytest
from smtprelay_operator import status

from tests.chart import chart
from tests.operator import statuses


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


CASES = [
    pytest.param(statuses.relay(), "Healthy", id="running-this-generation"),
    pytest.param(
        statuses.relay(running=status.Running(hash="old")), "Progressing", id="config-pending"
    ),
    pytest.param(
        statuses.relay(deployment=statuses.deployment(restart_hash="old")),
        "Progressing",
        id="rolling",
    ),
    pytest.param(
        statuses.relay(
            failure=status.Failure(reason="InvalidConfig", message="x: bad", stalled=True)
        ),
        "Degraded",
        id="stalled",
    ),
    pytest.param(
        statuses.relay(failure=status.Failure(reason="ApplyFailed", message="timeout")),
        "Progressing",
        id="retrying",
    ),
]


class TestArgoHealth:
    @pytest.mark.parametrize(("relay", "expected"), CASES)
    def test_health_follows_the_status(self, relay: dict[str, Any], expected: str) -> None:
        """Healthy only when the relay runs the generation; Degraded when Stalled."""
        assert _health(relay)[0] == expected

    def test_status_of_an_older_generation_is_progressing(self) -> None:
        """A spec the operator has not seen yet is never Healthy, whatever the conditions."""
        health, message = _health(statuses.relay(generation=3))
        assert health == "Progressing"
        assert "generation 3" in message

    def test_stalled_message_names_the_reason(self) -> None:
        """The message Argo CD shows carries the reason and the field."""
        failure = status.Failure(
            reason="SecretNotAllowed", message="spec.tls.secretName: no", stalled=True
        )
        assert _health(statuses.relay(failure=failure)) == (
            "Degraded",
            "SecretNotAllowed: spec.tls.secretName: no",
        )

    def test_no_status_yet(self) -> None:
        """A new SmtpRelay without status is Progressing."""
        relay = {"metadata": {"name": "mail", "generation": 1}}
        assert _health(relay)[0] == "Progressing"
