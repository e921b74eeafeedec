"""`smtprelay queue` against a live relay: list, show, flush, delete, bounce; no race with an attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from smtprelay import admin
from smtprelay.cli import main
from smtprelay.spool import PID_FILE, Busy, Spool

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(
        mx=[("later.test", "mx.later.test", 10), ("sender.test", "mx.sender.test", 10)],
        a=[("mx.later.test", "127.0.0.4"), ("mx.sender.test", "127.0.0.6")],
    )


def _relay(start_relay: Start, start_dns: Start, port: int) -> Relay:
    dns = start_dns(_zone())
    relay: Relay = start_relay(
        {"dnsServers": [dns.server], "delivery": {"port": port, "queueTimer": "1h"}}
    )
    return relay


def _queue_id(reply: str) -> str:
    return reply.rsplit(" ", 1)[-1]


def _queue(relay: Relay, *args: str) -> int:
    return main(["queue", "--spool", str(relay.spool), *args])


class TestInspect:
    def test_list_and_show_a_deferred_message(
        self,
        start_dns: Start,
        start_relay: Start,
        smtp_port: int,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """list shows id, tries, sender and pending recipient; show adds state and content."""
        relay = _relay(start_relay, start_dns, smtp_port)
        queue_id = _queue_id(send(relay.port, "alice@sender.test", ["u@later.test"]))
        wait_for(lambda: relay.events("delivery"), what="the deferred first attempt")
        state = relay.spool / "state" / f"{queue_id}.json"  # saved just after the log line
        wait_for(state.exists, what="the first attempt's state")
        assert _queue(relay, "list") == 0
        listing = capsys.readouterr().out
        assert queue_id in listing
        assert "alice@sender.test" in listing
        assert "u@later.test" in listing
        assert "-- 1 message(s)" in listing
        assert _queue(relay, "show", queue_id) == 0
        shown = capsys.readouterr().out
        assert "attempts: 1" in shown
        assert "recipient: u@later.test (pending)" in shown
        assert "Subject: hello" in shown
        assert _queue(relay, "show", "nosuchid") == 1


class TestChange:
    def test_delete_removes_a_message_for_good(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A deleted message is never delivered, not even after a flush with the MX back up."""
        relay = _relay(start_relay, start_dns, smtp_port)
        gone = _queue_id(send(relay.port, "alice@sender.test", ["gone@later.test"]))
        kept = _queue_id(send(relay.port, "alice@sender.test", ["kept@later.test"]))
        wait_for(lambda: len(relay.events("delivery")) == 2, what="two deferred attempts")
        assert _queue(relay, "delete", gone) == 0
        assert relay.queued() == [f"{kept}.eml"]
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        assert _queue(relay, "flush") == 0
        [got] = mx.wait_for_messages()
        assert got.recipients == ("kept@later.test",)
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        assert len(mx.messages) == 1

    def test_bounce_returns_the_message_to_its_sender(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """bounce fails the pending recipients and the sender gets an RFC 3464 report."""
        relay = _relay(start_relay, start_dns, smtp_port)
        sender_mx: Sink = start_sink("127.0.0.6", smtp_port)
        queue_id = _queue_id(send(relay.port, "alice@sender.test", ["u@later.test"]))
        wait_for(lambda: relay.events("delivery"), what="the deferred first attempt")
        assert _queue(relay, "bounce", queue_id) == 0
        [report] = sender_mx.wait_for_messages()
        assert report.sender == ""
        assert report.recipients == ("alice@sender.test",)
        assert report.message.get_content_type() == "multipart/report"
        assert b"returned to sender by the administrator" in report.data
        assert queue_id.encode() in report.data
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        assert _queue(relay, "bounce", queue_id) == 1  # gone now


class TestRace:
    def test_delete_waits_for_an_attempt_in_flight_and_never_double_sends(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """An attempt holds the message: delete waits (Busy), then finds it delivered, once."""
        hold = threading.Event()
        mx: Sink = start_sink("127.0.0.4", smtp_port, hold=hold)
        relay = _relay(start_relay, start_dns, smtp_port)
        queue_id = _queue_id(send(relay.port, "alice@sender.test", ["u@later.test"]))
        wait_for(mx.in_data.is_set, what="the attempt to reach DATA")
        spool = Spool(relay.spool)
        with pytest.raises(Busy):
            admin.delete(spool, queue_id, wait=0.3)
        with pytest.raises(Busy):
            admin.bounce_message(spool, queue_id, hostname="relay.test", now=0.0, wait=0.3)
        assert relay.queued() == [f"{queue_id}.eml"]  # untouched while the attempt runs
        hold.set()
        mx.wait_for_messages()
        assert admin.delete(spool, queue_id, wait=10) is False  # already delivered
        assert relay.queued() == []
        assert len(mx.messages) == 1

    def test_bounce_after_a_delivery_sends_no_report(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """bounce that waited for a successful attempt reports 'already gone' and bounces nothing."""
        hold = threading.Event()
        mx: Sink = start_sink("127.0.0.4", smtp_port, hold=hold)
        sender_mx: Sink = start_sink("127.0.0.6", smtp_port)
        relay = _relay(start_relay, start_dns, smtp_port)
        queue_id = _queue_id(send(relay.port, "alice@sender.test", ["u@later.test"]))
        wait_for(mx.in_data.is_set, what="the attempt to reach DATA")
        result: list[bool] = []
        waiter = threading.Thread(
            target=lambda: result.append(
                admin.bounce_message(
                    Spool(relay.spool), queue_id, hostname="relay.test", now=0.0, wait=20
                )
            )
        )
        waiter.start()
        hold.set()
        waiter.join(30)
        assert result == [False]
        assert len(mx.wait_for_messages()) == 1
        assert sender_mx.messages == []
        assert relay.events("bounced") == []


class _Unstarted(Relay):
    def start(self) -> None:
        """Started by the test itself (Relay's own start waits for /readyz)."""


class TestFlushAtStart:
    @pytest.mark.parametrize("count", [1, 2])
    def test_a_flush_as_soon_as_the_pid_file_appears_kills_nothing(
        self, tmp_path: Path, count: int
    ) -> None:
        """`queue flush` signals the PID in the spool (SIGUSR1); one sent while the relay or
        its workers are still starting is held until the handler is in place, then flushes,
        instead of ending a process by SIGUSR1's default action."""
        relay = _Unstarted(tmp_path, {"workers": count})
        pid_file = relay.spool / PID_FILE
        relay._log = relay.log_path.open("ab")
        relay.process = subprocess.Popen(
            [sys.executable, "-m", "smtprelay", "serve", "--config", str(relay.config_path)],
            stdout=relay._log,
            stderr=subprocess.STDOUT,
        )
        try:
            pid = int(
                wait_for(
                    lambda: pid_file.exists() and pid_file.read_text().strip(),
                    timeout=20,
                    interval=0.001,
                    what="the PID file",
                )
            )
            for _ in range(200):  # a burst of flushes through the whole start-up
                os.kill(pid, signal.SIGUSR1)
                if relay.ready():
                    break
            wait_for(relay.ready, timeout=20, what="the relay's /readyz")
            wait_for(lambda: len(relay.events("flush")) >= count, what="a flush in every worker")
            assert relay.process.poll() is None
            assert not relay.events("worker_exited")
        finally:
            relay.stop()
