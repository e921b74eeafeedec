"""Prometheus metrics, and the HTTP endpoint that serves them with the health probes.

``/healthz`` answers while the process runs; ``/readyz`` only while the SMTP listener is up
and the spool is writable, so Kubernetes routes no mail to a relay that cannot keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector


@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def rebuild(self) -> None:
        """Create every metric afresh (in a worker, once values go to shared files)."""
        self.registry = CollectorRegistry()
        self.__post_init__()

    def __post_init__(self) -> None:
        r = self.registry
        self.accepted = Counter(
            "smtprelay_messages_accepted", "Messages accepted and spooled.", registry=r
        )
        self.refused = Counter(
            "smtprelay_messages_refused",
            "Commands or messages refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.attempts = Counter(
            "smtprelay_delivery_attempts",
            "Per-recipient delivery outcomes (delivered, deferred, failed), by route.",
            ["route", "outcome"],
            registry=r,
        )
        self.bounced = Counter(
            "smtprelay_recipients_bounced", "Recipients returned to the sender.", registry=r
        )
        self.latency = Histogram(
            "smtprelay_delivery_latency_seconds",
            "Time from acceptance to delivery, per recipient.",
            buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 14400, 86400),
            registry=r,
        )
        self.connections = Counter(
            "smtprelay_connections", "SMTP connections accepted.", registry=r
        )
        self.connections_open = Gauge(
            "smtprelay_connections_open",
            "SMTP sessions open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.auth = Counter(
            "smtprelay_auth_attempts",
            "SMTP AUTH outcomes (success, failure, blocked by the failure limit).",
            ["outcome"],
            registry=r,
        )
        self.config_info = Gauge(
            "smtprelay_config_info",
            "1 for the relay.yaml in force (label hash: sha256 of the file), 0 for earlier ones.",
            ["hash"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.config_reloads = Counter(
            "smtprelay_config_reloads",
            "relay.yaml versions seen while running: switched to (reloaded), or refused "
            "(invalid, or a change that needs a restart).",
            ["outcome"],
            registry=r,
        )
        self.queue_size = Gauge("smtprelay_queue_messages", "Messages in the spool.", registry=r)
        self.corrupt = Gauge(
            "smtprelay_spool_corrupt_files",
            "Files set aside in the spool's corrupt/ directory (unreadable or not the relay's).",
            registry=r,
        )
        self.log_dropped = Counter(
            "smtprelay_log_lines_dropped",
            "Log lines a mail log target could not write (a full or failing volume).",
            registry=r,
        )
        self.oldest = Gauge(
            "smtprelay_queue_oldest_message_age_seconds",
            "Age of the oldest message in the spool.",
            registry=r,
        )


METRICS = _Metrics()


def enable_multiprocess(directory: Path) -> None:
    """In a worker process: keep metric values in ``directory``, where the supervisor
    sums them over all workers (prometheus_client's multiprocess mode)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    METRICS.rebuild()


class _WorkerTotals:
    """The workers' metrics summed, leaving out what the supervisor measures itself."""

    def __init__(self, directory: Path, skip: set[str]) -> None:
        self._collector = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
        self._skip = skip

    def collect(self) -> list[Metric]:
        metrics: list[Metric] = self._collector.collect()  # type: ignore[no-untyped-call]
        return [m for m in metrics if m.name not in self._skip]


def multiprocess_exposition(directory: Path, local: CollectorRegistry) -> bytes:
    """The workers' metrics summed (prometheus_client's multiprocess files), plus the
    supervisor's own queue gauges, which it reads from the spool."""
    own = {metric.name for metric in local.collect()}
    totals = CollectorRegistry()
    totals.register(_WorkerTotals(directory, own))
    return generate_latest(totals) + generate_latest(local)


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve_http(
    host: str,
    port: int,
    *,
    ready: Callable[[], bool],
    refresh: Callable[[], None],
    render: Callable[[], bytes] | None = None,
    config: Callable[[], dict[str, object]] | None = None,
) -> asyncio.Server:
    """A minimal HTTP/1.1 server for /metrics, /healthz, /readyz and /config.

    /config (and the body of /readyz) tell which relay.yaml runs: its hash, and the last
    version refused, if any.
    """

    def config_state() -> dict[str, object]:
        return config() if config is not None else {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path == "/healthz":
                writer.write(_response("200 OK", b"ok\n"))
            elif path == "/readyz":
                ok = ready()
                running = str(config_state().get("hash", ""))
                writer.write(
                    _response("200 OK", f"ready\nconfig {running}\n".encode())
                    if ok
                    else _response(
                        "503 Service Unavailable", f"not ready\nconfig {running}\n".encode()
                    )
                )
            elif path == "/config":
                body = json.dumps(config_state(), sort_keys=True).encode() + b"\n"
                writer.write(_response("200 OK", body, "application/json"))
            elif path == "/metrics":
                refresh()
                writer.write(
                    _response(
                        "200 OK",
                        render() if render else generate_latest(METRICS.registry),
                        CONTENT_TYPE_LATEST,
                    )
                )
            else:
                writer.write(_response("404 Not Found", b"not found\n"))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)
