"""The prometheus-operator objects an SmtpRelay asks for in ``spec.monitoring``.

Pure, like `render`: a PodMonitor scraping the relay pod's ``metrics`` port (Prometheus adds
the ``namespace`` and ``pod`` labels the shipped dashboard filters on), and a
PrometheusRule with the alerts a mail relay's owner needs. Every expression selects this
relay's series by the PodMonitor's job (``<namespace>/<name>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Object = dict[str, Any]

API_VERSION = "monitoring.coreos.com/v1"
OLDEST_MESSAGE_ALERT_SECONDS = 3600
FAILING_SHARE = 0.5


def _selector(namespace: str, name: str) -> str:
    return f'namespace="{namespace}", job="{namespace}/{name}"'


def pod_monitor(
    *, name: str, namespace: str, metadata: Object, pod_labels: Mapping[str, str]
) -> Object:
    return {
        "apiVersion": API_VERSION,
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": {
            "jobLabel": "",
            "selector": {"matchLabels": dict(pod_labels)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
        },
    }


def alerts(namespace: str, name: str) -> list[Object]:
    """The rules: relay down, mail waiting too long, deliveries failing, config refused."""
    where = _selector(namespace, name)
    about = {"namespace": namespace, "smtprelay": name}

    def rule(alert: str, expr: str, duration: str, severity: str, summary: str) -> Object:
        return {
            "alert": alert,
            "expr": expr,
            "for": duration,
            "labels": {"severity": severity, **about},
            "annotations": {"summary": summary},
        }

    attempts = f"smtprelay_delivery_attempts_total{{{where}}}"
    return [
        rule(
            "SmtpRelayDown",
            f"sum(up{{{where}}}) == 0 or absent(up{{{where}}})",
            "5m",
            "critical",
            f"SmtpRelay {namespace}/{name}: no relay pod answers the scrape; mail to it is refused",
        ),
        rule(
            "SmtpRelayMailWaiting",
            f"max(smtprelay_queue_oldest_message_age_seconds{{{where}}}) "
            f"> {OLDEST_MESSAGE_ALERT_SECONDS}",
            "10m",
            "warning",
            f"SmtpRelay {namespace}/{name}: a message has waited over an hour in the queue",
        ),
        rule(
            "SmtpRelayDeliveriesFailing",
            f'sum(rate({attempts[:-1]}, outcome!="delivered"}}[15m])) '
            f"/ sum(rate({attempts}[15m])) > {FAILING_SHARE}",
            "15m",
            "warning",
            f"SmtpRelay {namespace}/{name}: most delivery attempts are deferred or failing",
        ),
        rule(
            "SmtpRelayConfigRefused",
            f'increase(smtprelay_config_reloads_total{{{where}, outcome="refused"}}[10m]) > 0',
            "0m",
            "warning",
            f"SmtpRelay {namespace}/{name}: the relay refused a new relay.yaml and runs the "
            "previous one",
        ),
    ]


def prometheus_rule(*, name: str, namespace: str, metadata: Object) -> Object:
    return {
        "apiVersion": API_VERSION,
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": {
            "groups": [{"name": f"smtprelay.{namespace}.{name}", "rules": alerts(namespace, name)}]
        },
    }
