"""What got a 250 survives the process: SIGKILL, restart, SIGTERM."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(mx=[("later.test", "mx.later.test", 10)], a=[("mx.later.test", "127.0.0.4")])


class TestCrash:
    def test_queued_mail_is_delivered_after_sigkill_and_restart(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Messages accepted before a SIGKILL are delivered by the next process on the spool."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1h"}}
        )
        ids = {
            send(relay.port, "alice@sender.test", [f"u{i}@later.test"]).rsplit(" ", 1)[-1]
            for i in range(5)
        }
        wait_for(lambda: len(relay.events("delivery")) == 5, what="five deferred attempts")
        relay.kill()
        assert {name.removesuffix(".eml") for name in relay.queued()} == ids
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        relay.start()
        got = mx.wait_for_messages(5)
        assert sorted(r for m in got for r in m.recipients) == [
            f"u{i}@later.test" for i in range(5)
        ]
        [restart] = [e for e in relay.events("started") if e["recovered"]]
        assert restart["recovered"] == 5
        wait_for(lambda: relay.queued() == [], what="the spool to empty")

    def test_sigterm_exits_zero_and_keeps_the_queue(
        self, start_dns: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """SIGTERM is a clean stop: exit 0, queued mail still on disk."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1h"}}
        )
        send(relay.port, "alice@sender.test", ["u@later.test"])
        assert relay.stop() == 0
        assert len(relay.queued()) == 1
        assert relay.events("stopped")[-1]["queued"] == 1

    def test_queue_flush_makes_the_running_relay_try_now(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """`smtprelay queue flush` delivers a deferred message without waiting an hour."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1h"}}
        )
        send(relay.port, "alice@sender.test", ["u@later.test"])
        wait_for(lambda: relay.events("delivery"), what="the first, deferred attempt")
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        assert relay.process is not None
        from smtprelay.cli import main

        assert main(["queue", "--spool", str(relay.spool), "flush"]) == 0
        [got] = mx.wait_for_messages()
        assert got.recipients == ("u@later.test",)
        assert os.path.exists(relay.spool / "smtprelay.pid")
        assert signal.SIGUSR1  # flush is delivered by signal to the pid in the spool
