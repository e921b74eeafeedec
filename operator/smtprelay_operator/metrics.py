"""The operator's own Prometheus metrics: reconciles by outcome, their duration, the queue."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
RECONCILES = Counter(
    "smtprelay_operator_reconciles",
    "SmtpRelay reconciles, by outcome: settled, failed (retried with backoff), waiting (for "
    "the relay to take a new relay.yaml), deferred (the pod's objects applied, the rest "
    "after the urgent work), gone.",
    ["outcome"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "smtprelay_operator_reconcile_duration_seconds",
    "Time one reconcile of one SmtpRelay took.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
APPLIES = Counter(
    "smtprelay_operator_applies",
    "Owned objects a reconcile looked at, by outcome: applied (a server-side apply sent) or "
    "unchanged (applied just so before and untouched since, as the watch reports: skipped).",
    ["outcome"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "smtprelay_operator_api_requests",
    "Requests the reconciles sent to the API server (kopf's watches aside), by HTTP method.",
    ["method"],
    registry=REGISTRY,
)
QUEUED = Gauge(
    "smtprelay_operator_queue_waiting",
    "SmtpRelays waiting for a worker now.",
    registry=REGISTRY,
)


def outcome_of(result: bool | float | None) -> str:
    if result is None:
        return "gone"
    if result is False:
        return "failed"
    if result is True:
        return "settled"
    return "waiting" if result > 0 else "deferred"


def serve(address: str) -> None:
    """/metrics on ``host:port`` (a thread of prometheus_client's)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)
