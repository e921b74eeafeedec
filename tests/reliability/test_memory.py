"""Memory follows configuration, not input: a 25 MiB message of 3-byte lines, received and
relayed, raises the relay's peak RSS (VmHWM in /proc) by a few MiB, not by the message."""

from __future__ import annotations

import os
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Relay, free_port, postfix_tool, wait_for

Start = Callable[..., Any]
MESSAGE_MIB = 25
# The documented bound (docs/reliability.md): what one session and one delivery may add to
# the relay's resident memory, whatever the message: 64 KiB pieces and their copies, socket
# buffers, the allocator's slack. aiosmtpd's own DATA took ~57x the message size.
BOUND_MIB = 16


def _status(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure in KiB (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@pytest.fixture
def discarding_sink() -> Iterator[str]:
    """Postfix's smtp-sink, keeping nothing: the relay's memory is what is measured."""
    port = free_port("127.0.0.9")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [postfix_tool("smtp-sink"), *user, f"127.0.0.9:{port}", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"127.0.0.9:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _send(port: int, data: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("bob@example.test")
        code, reply = client.data(data)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]


def _delivered(relay: Relay, queue_id: str) -> bool:
    return any(
        e["queue_id"] == queue_id and e["outcome"] == "delivered" for e in relay.events("delivery")
    )


def test_peak_memory_stays_within_the_bound(start_relay: Start, discarding_sink: str) -> None:
    """Receiving and relaying 25 MiB of 3-byte lines adds at most BOUND_MIB to peak RSS."""
    relay: Relay = start_relay(
        {"gateway": {"host": discarding_sink, "sendAll": True}, "maxMessageSize": "30Mi"}
    )
    assert relay.process is not None
    pid = relay.process.pid
    warm = _send(relay.port, b"Subject: warm-up\r\n\r\nhello\r\n")  # every code path once
    wait_for(lambda: _delivered(relay, warm), what="the warm-up delivery")
    idle = _status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from here
    body = b"Subject: short lines\r\n\r\n" + b"x\r\n" * (MESSAGE_MIB * 1024 * 1024 // 3)
    big = _send(relay.port, body)
    wait_for(lambda: _delivered(relay, big), timeout=120, what="the 25 MiB delivery")
    peak = _status(pid, "VmHWM")
    [accepted] = [e for e in relay.events("accepted") if e["queue_id"] == big]
    assert accepted["size"] >= MESSAGE_MIB * 1024 * 1024
    print(f"idle {idle} KiB, peak {peak} KiB, growth {(peak - idle) / 1024:.1f} MiB")
    assert peak - idle <= BOUND_MIB * 1024, f"idle {idle} KiB, peak {peak} KiB"
