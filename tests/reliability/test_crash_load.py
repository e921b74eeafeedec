"""Crash under load: 2,000 messages over 20 sessions while the relay (two workers) is
SIGKILLed at random moments and restarted on the same spool. Every message that got a 250
arrives at least once; duplicates (delivered, then killed before the spool forgot) are
counted and reported."""

from __future__ import annotations

import random
import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import message

Start = Callable[..., Any]
SESSIONS = 20
MESSAGES = 2000
KILLS = 5


def _workers(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


class _Load:
    """SESSIONS clients sharing MESSAGES to send; each reconnects when the relay dies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[str] = set()
        self.sent = 0
        self.failed_sends = 0
        self._next = 0
        self._lock = threading.Lock()

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= MESSAGES:
                return None
            self._next += 1
            return self._next

    def _give_back(self) -> None:
        with self._lock:
            self._next -= 1  # resent later under a new number: it got no 250
            self.failed_sends += 1

    def client(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as session:
                    session.ehlo("load.test")
                    while (number := self._take()) is not None:
                        try:
                            queue_id = self._send(session, number)
                        except BaseException:
                            self._give_back()
                            raise
                        with self._lock:
                            self.sent += 1
                            self.acked.add(queue_id)
                    return
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # the relay is down: try again when it is back

    @staticmethod
    def _send(session: smtplib.SMTP, number: int) -> str:
        recipient = f"m{number}@later.test"
        code, reply = session.mail("load@sender.test")
        if code != 250:
            raise smtplib.SMTPException(reply)
        code, reply = session.rcpt(recipient)
        if code != 250:
            raise smtplib.SMTPException(reply)
        code, reply = session.data(message("load@sender.test", [recipient], f"m{number}"))
        if code != 250:
            raise smtplib.SMTPException(reply)
        return reply.decode().rsplit(" ", 1)[-1]


def _delivered_ids(sink: Sink) -> list[str]:
    with sink.lock:
        messages = list(sink.messages)
    return [m.message["Received"].split(" id ", 1)[1].split()[0].rstrip(";") for m in messages]


def test_sigkill_under_load_loses_no_acknowledged_message(
    start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
) -> None:
    """2,000 messages, 20 sessions, 5 SIGKILLs with restarts: all 250'd messages arrive."""
    dns = start_dns(
        Zone(mx=[("later.test", "mx.later.test", 10)], a=[("mx.later.test", "127.0.0.4")])
    )
    mx: Sink = start_sink("127.0.0.4", smtp_port)
    relay: Relay = start_relay(
        {
            "dnsServers": [dns.server],
            "delivery": {"port": smtp_port, "queueTimer": "1s"},
            "workers": 2,
        }
    )
    load = _Load(relay.port)
    deadline = time.monotonic() + 240
    clients = [threading.Thread(target=load.client, args=(deadline,)) for _ in range(SESSIONS)]
    for thread in clients:
        thread.start()
    chance = random.Random()  # noqa: S311 -- kill moments, not secrets
    kills = 0
    while kills < KILLS and any(t.is_alive() for t in clients):
        time.sleep(chance.uniform(0.2, 1.5))
        assert relay.process is not None
        workers = _workers(relay.process.pid)
        relay.kill()
        kills += 1
        wait_for(lambda: all(map(_gone, workers)), what="the workers to die")  # noqa: B023
        relay.start()
    for thread in clients:
        thread.join(max(1.0, deadline - time.monotonic()))
    assert load.sent == MESSAGES, f"only {load.sent} messages were acknowledged in time"
    wait_for(
        lambda: load.acked <= set(_delivered_ids(mx)),
        timeout=120,
        what="every acknowledged message at the MX",
    )
    delivered = _delivered_ids(mx)
    duplicates = len(delivered) - len(set(delivered))
    print(
        f"crash test: {kills} SIGKILLs; sent {MESSAGES + load.failed_sends} "
        f"(acked {len(load.acked)}, unacknowledged {load.failed_sends}), "
        f"delivered {len(set(delivered))} distinct, {duplicates} duplicates"
    )
    assert len(load.acked) == MESSAGES
