"""Fixtures that start the relay's real peers for one test and stop them after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Dnsmasq, Relay, Sink, Zone, free_port


@pytest.fixture
def smtp_port() -> int:
    """The port every MX sink of a test listens on (each on its own 127.0.0.x address)."""
    return free_port()


@pytest.fixture
def start_dns(tmp_path: Path) -> Iterator[Callable[[Zone], Dnsmasq]]:
    servers: list[Dnsmasq] = []

    def start(zone: Zone) -> Dnsmasq:
        server = Dnsmasq(zone, tmp_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_sink() -> Iterator[Callable[..., Sink]]:
    sinks: list[Sink] = []

    def start(host: str, port: int, **replies: Any) -> Sink:
        sink = Sink(host, port, **replies)
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    relays: list[Relay] = []

    def start(config: dict[str, Any], name: str = "relay", **options: Any) -> Relay:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)  # a test may lay out a spool before the start
        relay = Relay(workdir, config, **options)
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        if relay.process is not None and relay.process.poll() is None:
            relay.stop()
