"""kstatus (the library Flux and Helm 4's --wait use) reads the status the operator writes.

The statuses come from the operator's own `status.compute`; the verdicts from the real
sigs.k8s.io/cli-utils kstatus (tests/operator/kstatus.py). On the live control plane, an
SmtpRelay is Current once Ready and Failed once Stalled.
"""

from __future__ import annotations

from typing import Any

import pytest
from smtprelay_operator import status

from tests.operator import kstatus, statuses
from tests.operator.support import (
    CONVERGE,
    Cluster,
    Operator,
    condition,
    create_relay,
    wait_for,
    wait_ready,
)

CASES = [
    pytest.param(statuses.relay(), "Current", id="running-this-generation"),
    pytest.param(
        statuses.relay(deployment=statuses.deployment(restart_hash="old")),
        "InProgress",
        id="rolling",
    ),
    pytest.param(
        statuses.relay(deployment=statuses.deployment(available=0)),
        "InProgress",
        id="pod-not-ready",
    ),
    pytest.param(
        statuses.relay(running=status.Running(hash="old")), "InProgress", id="config-not-picked-up"
    ),
    pytest.param(
        statuses.relay(failure=status.Failure(reason="ApplyFailed", message="timeout")),
        "InProgress",
        id="apply-retried",
    ),
    pytest.param(
        statuses.relay(
            failure=status.Failure(reason="InvalidConfig", message="x: bad", stalled=True)
        ),
        "Failed",
        id="invalid-spec",
    ),
    pytest.param(statuses.relay(generation=3), "InProgress", id="generation-not-observed-yet"),
]


class TestKstatusVerdicts:
    @pytest.mark.parametrize(("relay", "expected"), CASES)
    def test_verdict(self, relay: dict[str, Any], expected: str) -> None:
        """InProgress while the relay does not run the generation, Failed when Stalled,
        Current once it runs it."""
        assert kstatus.compute(relay)[0] == expected


@pytest.mark.cluster
class TestLiveObjects:
    def test_ready_relay_is_current_and_invalid_one_failed(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """The objects on the API server, as kstatus reads them after `kubectl get`."""
        create_relay(cluster, "mail")
        ready = wait_ready(cluster, "mail")
        assert kstatus.compute(ready)[0] == "Current"
        cluster.patch("smtprelay", "mail", {"spec": {"dnsServers": ["192.0.2.53:99999"]}})

        def stalled() -> bool:
            return condition(cluster.must_get("smtprelay", "mail"), "Stalled").get("status") == (
                "True"
            )

        wait_for(stalled, timeout=CONVERGE, what="Stalled InvalidConfig")
        verdict, message = kstatus.compute(cluster.must_get("smtprelay", "mail"))
        assert verdict == "Failed"
        assert "dnsServers[0]" in message
