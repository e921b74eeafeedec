"""Prometheus metrics move as mail flows; health probes; the Grafana dashboard uses real series."""

from __future__ import annotations

import json
import re
import smtplib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from smtprelay_operator import monitoring

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]
DASHBOARD = Path(__file__).parents[2] / "charts/smtprelay-operator/dashboards/smtprelay.json"


def _zone() -> Zone:
    return Zone(
        mx=[("example.test", "mx1.example.test", 10), ("later.test", "mx.later.test", 10)],
        a=[("mx1.example.test", "127.0.0.2"), ("mx.later.test", "127.0.0.4")],
    )


def _samples(relay: Relay) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics scrape, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(relay.metrics()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(relay: Relay, name: str, **labels: str) -> float:
    return _samples(relay).get((name, tuple(sorted(labels.items()))), 0.0)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 -- http:// only
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


class TestCounters:
    def test_counters_move_as_mail_flows(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """accepted, refused by reason, attempts by route/outcome, latency and connections."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port, "queueTimer": "1h"},
                "allowedNetworks": ["127.0.0.1/32"],
            }
        )
        assert _value(relay, "smtprelay_messages_accepted_total") == 0
        for n in range(3):
            send(relay.port, "alice@sender.test", [f"u{n}@example.test"])
        send(relay.port, "alice@sender.test", ["late@later.test"])  # its MX is down: deferred
        with smtplib.SMTP("127.0.0.1", relay.port, source_address=("127.0.0.8", 0)) as client:
            client.ehlo("outsider.test")
            client.mail("eve@sender.test")
            client.rcpt("bob@example.test")
        mx.wait_for_messages(3)
        wait_for(
            lambda: (
                _value(
                    relay, "smtprelay_delivery_attempts_total", route="direct", outcome="deferred"
                )
                == 1
            ),
            what="the deferred attempt to be counted",
        )
        assert _value(relay, "smtprelay_messages_accepted_total") == 4
        assert _value(relay, "smtprelay_messages_refused_total", reason="relay_denied") == 1
        wait_for(
            lambda: (
                _value(
                    relay, "smtprelay_delivery_attempts_total", route="direct", outcome="delivered"
                )
                == 3
            ),
            what="three deliveries counted",
        )
        assert _value(relay, "smtprelay_delivery_latency_seconds_count") == 3
        assert _value(relay, "smtprelay_connections_total") == 5
        assert _value(relay, "smtprelay_queue_messages") == 1
        assert _value(relay, "smtprelay_queue_oldest_message_age_seconds") >= 0
        assert _value(relay, "smtprelay_connections_open") == 0

    def test_oldest_message_age_grows_while_mail_waits(
        self, start_dns: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """The oldest-age gauge is the age of the first message still in the spool."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1h"}}
        )
        send(relay.port, "alice@sender.test", ["late@later.test"])
        first = _value(relay, "smtprelay_queue_oldest_message_age_seconds")
        wait_for(
            lambda: _value(relay, "smtprelay_queue_oldest_message_age_seconds") > first + 0.5,
            what="the age to grow",
        )


class TestProbes:
    def test_healthz_and_readyz(self, start_relay: Start) -> None:
        """/healthz is 200 while alive; /readyz turns 503 when the spool cannot be written."""
        relay: Relay = start_relay({})
        base = f"http://127.0.0.1:{relay.metrics_port}"
        assert _status(f"{base}/healthz") == 200
        assert _status(f"{base}/readyz") == 200
        assert _status(f"{base}/nothing") == 404
        queue = relay.spool / "queue"
        queue.rename(relay.spool / "queue.away")
        queue.write_text("not a directory")  # the probe's file cannot be created
        try:
            assert _status(f"{base}/readyz") == 503
            assert _status(f"{base}/healthz") == 200
        finally:
            queue.unlink()
            (relay.spool / "queue.away").rename(queue)
        assert _status(f"{base}/readyz") == 200


class TestAlerts:
    def test_every_alert_names_a_series_the_relay_exports(self, start_relay: Start) -> None:
        """The PrometheusRule spec.monitoring renders is built on metrics a scrape has."""
        expressions = [rule["expr"] for rule in monitoring.alerts("ns", "mail")]
        used = {name for e in expressions for name in re.findall(r"smtprelay_[a-z_]+", e)}
        relay: Relay = start_relay({})
        exported = {name for name, _ in _samples(relay)}
        families = {f.name for f in text_string_to_metric_families(relay.metrics())}
        families |= {f"{name}_total" for name in families}
        assert used
        assert used <= exported | families, used - exported - families


class TestDashboard:
    def test_every_dashboard_query_names_a_series_the_relay_exports(
        self, start_relay: Start
    ) -> None:
        """The Grafana dashboard is built on metrics a live scrape actually has."""
        dashboard = json.loads(DASHBOARD.read_text())
        expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        used = {name for e in expressions for name in re.findall(r"smtprelay_[a-z_]+", e)}
        relay: Relay = start_relay({})
        exported = {name for name, _ in _samples(relay)}
        # a labelled counter shows its samples only once a label set is used
        families = {f.name for f in text_string_to_metric_families(relay.metrics())}
        families |= {f"{name}_total" for name in families}
        assert used <= exported | families, used - exported - families
        titles = " ".join(p["title"].lower() for p in dashboard["panels"])
        for topic in ("accepted", "route", "queue", "oldest", "latency", "connections"):
            assert topic in titles
        assert any("histogram_quantile(0.95" in e for e in expressions)
