"""Fixtures that start the relay's real peers for one test and stop them after it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Dnsmasq, Relay, Sink, Zone, free_port, postfix_tool


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


@pytest.fixture
def smtp_sink() -> Iterator[tuple[str, Path]]:
    """Postfix's smtp-sink on 127.0.0.2, dumping every transaction to its own file."""
    # As root smtp-sink must drop to a user (-u nobody), who needs a directory it can reach:
    # not under pytest's private tmp_path.
    dumps = Path(tempfile.mkdtemp(prefix="smtprelay-sink-"))
    dumps.chmod(0o777)
    port = free_port("127.0.0.2")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [postfix_tool("smtp-sink"), *user, "-d", f"{dumps}/msg.", f"127.0.0.2:{port}", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"127.0.0.2:{port}", dumps
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(dumps, ignore_errors=True)
