"""A full spool volume with the default file logging on it: 4xx only, nothing 250'd lost,
and mail accepted again once space returns."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import message, send
from tests.relay.test_durability import _delivered_ids, _small_disk
from tests.reliability.wire import Wire

Start = Callable[..., Any]


def _dropped(relay: Relay) -> float:
    found = re.search(r"^smtprelay_log_lines_dropped_total (\S+)$", relay.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def test_a_full_volume_answers_4xx_only_and_recovers(
    start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int, tmp_path: Path
) -> None:
    """On a 256 KiB tmpfs holding the spool and the day log file: SIZE beyond the free
    space gets 452 at MAIL; messages get 250 until the disk fills, then 452, never a 5xx;
    log lines that cannot be written are dropped and counted; every 250'd message is
    delivered, and the relay accepts mail again once deliveries free the space."""
    dns = start_dns(
        Zone(mx=[("later.test", "mx.later.test", 10)], a=[("mx.later.test", "127.0.0.4")])
    )
    spool = tmp_path / "relay" / "spool"
    relay: Relay = start_relay(
        {
            "dnsServers": [dns.server],
            "delivery": {"port": smtp_port, "queueTimer": "1s"},
            "logging": {"target": "file"},
        },
        wrapper=_small_disk(256, str(spool)),
    )
    accepted: set[str] = set()
    codes: list[int] = []
    body = "x" * 70 + "\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("client.test")
        code, reply = client.mail("alice@sender.test", ["SIZE=20000000"])  # < maxMessageSize
        assert code == 452, reply
        client.rset()
        for i in range(400):  # bounded: the disk holds far fewer
            code, reply = client.mail("alice@sender.test")
            if code == 250:
                code, reply = client.rcpt(f"u{i}@later.test")
            if code == 250:
                code, reply = client.data(message("alice@sender.test", ["x"], body=body * 40))
                if code == 250:
                    accepted.add(reply.decode().rsplit(" ", 1)[-1])
            else:
                client.rset()
            codes.append(code)
            assert code in (250, 452), (code, reply)
            if codes.count(452) >= 5:
                break
    assert 452 in codes, "the disk never filled"
    assert accepted

    def refusals_dropped() -> bool:
        """More refusals, each a log line for the full disk; true once one was dropped."""
        with Wire(relay.port) as wire:
            wire.command(b"EHLO client.test")
            wire.command(b"MAIL FROM:<alice@sender.test>")
            for _ in range(15):
                assert wire.command(b"RCPT TO:<bad\x01@later.test>").startswith(b"553")
        return _dropped(relay) > 0

    wait_for(refusals_dropped, timeout=60, what="a log line dropped for the full disk")
    assert relay.ready()
    mx: Sink = start_sink("127.0.0.4", smtp_port)
    wait_for(lambda: accepted <= _delivered_ids(mx), timeout=90, what="every 250'd message")
    wait_for(lambda: relay.queued() == [], timeout=30, what="the spool to empty")
    send(relay.port, "alice@sender.test", ["again@later.test"])  # space is back: 250
