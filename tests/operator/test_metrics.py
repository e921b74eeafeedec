"""The operator's own /metrics, and what they show: a settled SmtpRelay costs no applies."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import controlplane
from tests.cluster.controlplane import ControlPlane
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
_SAMPLE = re.compile(r"^(smtprelay_operator_\w+?)(?:\{(.*)\})? (\S+)$", re.M)


class Metrics:
    def __init__(self, url: str) -> None:
        self.url = url

    def scrape(self) -> dict[str, float]:
        """``name{labels}`` → value, for the operator's own series."""
        with urllib.request.urlopen(self.url, timeout=5) as response:  # noqa: S310 -- loopback
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        return {
            f"{name}{{{labels or ''}}}": float(value)
            for name, labels, value in _SAMPLE.findall(text)
        }

    def value(self, series: str) -> float:
        return self.scrape().get(series, 0.0)


@pytest.fixture
def metrics(
    control_plane: ControlPlane, cluster: Cluster, tmp_path: Path
) -> Iterator[tuple[Operator, Metrics]]:
    port = controlplane.free_port()
    operator = Operator(
        control_plane,
        cluster.namespace,
        tmp_path,
        extra_args=("--relay-config-url=", f"--metrics-listen=127.0.0.1:{port}"),
    )
    with running_operator(operator) as running:
        yield running, Metrics(f"http://127.0.0.1:{port}/metrics")


SETTLED = 'smtprelay_operator_reconciles_total{outcome="settled"}'
APPLIED = 'smtprelay_operator_applies_total{outcome="applied"}'
UNCHANGED = 'smtprelay_operator_applies_total{outcome="unchanged"}'


class TestMetrics:
    def test_reconciles_applies_and_requests_are_counted(
        self, cluster: Cluster, metrics: tuple[Operator, Metrics]
    ) -> None:
        """One SmtpRelay made Ready: settled reconciles, its five objects applied, the API
        requests by method, the reconcile duration and the queue are all on /metrics."""
        _, scrape = metrics
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        seen = scrape.scrape()
        assert seen[SETTLED] >= 1
        assert seen[APPLIED] >= 5  # ConfigMap, PVC, two Services, Deployment
        assert seen['smtprelay_operator_api_requests_total{method="PATCH"}'] >= 6  # + status
        assert seen["smtprelay_operator_reconcile_duration_seconds_count{}"] >= 1
        assert "smtprelay_operator_queue_waiting{}" in seen

    def test_a_deployment_status_change_applies_nothing(
        self, cluster: Cluster, metrics: tuple[Operator, Metrics]
    ) -> None:
        """The pod is replaced: the Deployment's status changes twice and the SmtpRelay is
        reconciled (Ready goes False, then True again), but its objects, untouched since
        they were applied, are not applied again."""
        _, scrape = metrics
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        applied = scrape.value(APPLIED)
        settled = scrape.value(SETTLED)
        unchanged = scrape.value(UNCHANGED)
        cluster.kubectl("delete", "pod", "-l", "app.kubernetes.io/instance=mail", "--wait=false")
        wait_for(
            lambda: scrape.value(UNCHANGED) >= unchanged + 5 and scrape.value(SETTLED) > settled,
            timeout=CONVERGE,
            what="the SmtpRelay to be reconciled after its pod went",
        )
        wait_ready(cluster, "mail")
        assert scrape.value(APPLIED) == applied
