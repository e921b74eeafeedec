"""SIGTERM: stop accepting, finish sessions and attempts within the grace, exit 0, lose nothing."""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from smtprelay import service
from smtprelay_operator import render

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import message

Start = Callable[..., Any]
QUEUED = re.compile(r"queued as ([0-9a-f]+)")
TRACE_ID = re.compile(rb"\(smtprelay\) with \S+ id ([0-9a-f]+)")


def _zone() -> Zone:
    return Zone(
        mx=[("example.test", "mx1.example.test", 10)], a=[("mx1.example.test", "127.0.0.2")]
    )


def _relay(start_relay: Start, start_dns: Start, port: int, **delivery: Any) -> Relay:
    dns = start_dns(_zone())
    relay: Relay = start_relay(
        {"dnsServers": [dns.server], "delivery": {"port": port, "queueTimer": "1h", **delivery}}
    )
    return relay


def _terminate(relay: Relay) -> None:
    assert relay.process is not None
    relay.process.terminate()


def _exit_code(relay: Relay, timeout: float) -> int:
    assert relay.process is not None
    code = relay.process.wait(timeout)
    relay.stop()  # closes the log handle
    return int(code)


class _Sender(threading.Thread):
    """One client session sending messages until the relay turns it away; keeps its 250s."""

    def __init__(self, port: int, number: int, limit: int) -> None:
        super().__init__(daemon=True)
        self.port, self.number, self.limit = port, number, limit
        self.accepted: list[str] = []

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                client.ehlo("burst.test")
                for n in range(self.limit):
                    recipient = f"t{self.number}m{n}@example.test"
                    client.mail("burst@sender.test")
                    client.rcpt(recipient)
                    code, reply = client.data(message("burst@sender.test", [recipient]))
                    if code != 250:
                        return
                    found = QUEUED.search(reply.decode())
                    assert found is not None
                    self.accepted.append(found.group(1))
        except (smtplib.SMTPException, OSError):
            return  # 421 or a closed connection: the relay is stopping


class TestGrace:
    def test_the_drain_fits_in_the_pods_termination_grace(self) -> None:
        """Session and delivery drains run side by side and end before the kubelet's SIGKILL."""
        deployment = render.render(
            name="r",
            namespace="ns",
            spec={},
            owner=None,
            defaults=render.OperatorDefaults(relay_image="registry.example/smtprelay:test"),
        ).deployment
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace == service.TERMINATION_GRACE
        assert max(service.SESSION_GRACE, service.DELIVERY_GRACE) + 5 <= grace


class TestSigterm:
    def test_a_burst_cut_by_sigterm_loses_nothing(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Every message that got a 250 before or during SIGTERM is delivered after a restart."""
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay = _relay(start_relay, start_dns, smtp_port)
        senders = [_Sender(relay.port, number, limit=60) for number in range(8)]
        for sender in senders:
            sender.start()
        wait_for(lambda: sum(len(s.accepted) for s in senders) >= 40, what="the burst to get going")
        began = time.monotonic()
        _terminate(relay)
        assert _exit_code(relay, timeout=service.TERMINATION_GRACE) == 0
        assert time.monotonic() - began < service.SESSION_GRACE
        for sender in senders:
            sender.join(30)
        accepted = {queue_id for s in senders for queue_id in s.accepted}
        assert 40 <= len(accepted) < 8 * 60  # the stop cut the burst short
        relay.start()

        def delivered() -> set[str]:
            with mx.lock:
                return {m.decode() for got in mx.messages for m in TRACE_ID.findall(got.data)}

        wait_for(lambda: accepted <= delivered(), timeout=60, what="every 250'd message")
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        [stopped] = relay.events("stopped")
        assert stopped["sessions_cut"] == 0

    def test_an_idle_session_is_told_421_and_the_relay_exits_at_once(
        self, start_dns: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A client between transactions gets 421 4.3.2; nobody waits out the session grace."""
        relay = _relay(start_relay, start_dns, smtp_port)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as client:
            reader = client.makefile("rb")
            assert reader.readline().startswith(b"220")
            client.sendall(b"EHLO idle.test\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            began = time.monotonic()
            _terminate(relay)
            assert reader.readline().startswith(b"421 4.3.2")
            assert reader.readline() == b""  # closed
        assert _exit_code(relay, timeout=10) == 0
        assert time.monotonic() - began < 5

    def test_a_transaction_in_progress_finishes_and_gets_its_250(
        self, start_dns: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """SIGTERM between RCPT and DATA: the DATA is still accepted (on disk), then 421."""
        relay = _relay(start_relay, start_dns, smtp_port)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("busy.test")
            client.mail("alice@sender.test")
            client.rcpt("bob@nowhere.test")
            _terminate(relay)
            wait_for(lambda: relay.events("stopping"), what="the relay to begin stopping")
            code, reply = client.data(message("alice@sender.test", ["bob@nowhere.test"]))
            assert code == 250, reply
            queue_id = QUEUED.search(reply.decode())
            assert queue_id is not None
            assert client.noop()[0] == 421
        assert _exit_code(relay, timeout=service.TERMINATION_GRACE) == 0
        assert f"{queue_id.group(1)}.eml" in relay.queued()

    def test_a_delivery_in_flight_is_allowed_to_finish(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """An attempt under way at SIGTERM completes within the delivery grace: sent once, dequeued."""
        hold = threading.Event()
        mx: Sink = start_sink("127.0.0.2", smtp_port, hold=hold)
        relay = _relay(start_relay, start_dns, smtp_port)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.sendmail("alice@sender.test", ["bob@example.test"], message("a", ["b"]))
        wait_for(mx.in_data.is_set, what="the attempt to reach DATA")
        _terminate(relay)
        wait_for(lambda: relay.events("stopping"), what="the relay to begin stopping")
        hold.set()
        assert _exit_code(relay, timeout=service.TERMINATION_GRACE) == 0
        assert len(mx.wait_for_messages()) == 1
        assert relay.queued() == []
        assert relay.events("stopped")[-1]["queued"] == 0
