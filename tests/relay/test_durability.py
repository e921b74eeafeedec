"""What got a 250 survives the process: SIGKILL, restart, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shlex
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtprelay.spool import Spool

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import message, send

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(mx=[("later.test", "mx.later.test", 10)], a=[("mx.later.test", "127.0.0.4")])


def _receive(spool: Spool, queue_id: str, subject: bytes) -> None:
    """A message received through the spool's own draft and commit, as the relay does."""

    async def receive() -> None:
        draft = spool.draft(
            sender="alice@sender.test", recipients=("bob@later.test",), client="", queue_id=queue_id
        )
        await draft.write(b"Subject: " + subject + b"\r\n\r\nbody\r\n")
        await spool.commit(draft)

    asyncio.run(receive())


class TestCrash:
    def test_queued_mail_is_delivered_after_sigkill_and_restart(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Messages accepted before a SIGKILL are delivered by the next process on the spool."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "2s"}}
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

    def test_a_receipt_a_crash_cut_short_is_removed_never_delivered(
        self, tmp_path: Path, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A queue file whose size is not the length its envelope declares is what a crash
        before the fsync leaves (no 250 was given): once it is a minute old the relay
        removes it and says so; a younger one may be a writer's in the instant before its
        lock, and is left alone. The whole one beside them is delivered."""
        spool_dir = tmp_path / "relay" / "spool"
        queue = Spool(spool_dir)

        _receive(queue, "1a0000000000000000001", b"whole")
        for queue_id in ("1a0000000000000000002", "1a0000000000000000003"):
            _receive(queue, queue_id, b"cut")
            cut = spool_dir / "queue" / f"{queue_id}.eml"
            cut.write_bytes(cut.read_bytes()[:-4])
        hour_ago = time.time() - 3600
        os.utime(spool_dir / "queue" / "1a0000000000000000002.eml", (hour_ago, hour_ago))
        sink: Sink = start_sink("127.0.0.1", smtp_port)
        relay: Relay = start_relay({"gateway": {"host": f"127.0.0.1:{smtp_port}", "sendAll": True}})
        [got] = sink.wait_for_messages(1)
        assert b"Subject: whole" in got.data
        wait_for(lambda: relay.events("incomplete_removed"), what="the cut file's removal")
        [removed] = relay.events("incomplete_removed")
        assert removed["queue_id"] == "1a0000000000000000002"
        wait_for(lambda: relay.queued() == ["1a0000000000000000003.eml"], what="only the young one")
        assert len(sink.messages) == 1

    def test_a_symlink_or_fifo_named_like_a_message_is_set_aside_never_read_through(
        self, tmp_path: Path, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A file on the volume may be hostile: a symlink to a message elsewhere is not
        delivered (nor its target touched), a FIFO does not hang the worker; both go to
        corrupt/ and the real message beside them is delivered."""
        spool_dir = tmp_path / "relay" / "spool"
        queue = Spool(spool_dir)
        elsewhere = Spool(tmp_path / "elsewhere")

        _receive(queue, "1a0000000000000000001", b"real")
        _receive(elsewhere, "1a0000000000000000002", b"not-in-the-spool")
        target = tmp_path / "elsewhere" / "queue" / "1a0000000000000000002.eml"
        before = target.read_bytes()
        (spool_dir / "queue" / "1a0000000000000000002.eml").symlink_to(target)
        os.mkfifo(spool_dir / "queue" / "1a0000000000000000003.eml")
        sink: Sink = start_sink("127.0.0.1", smtp_port)
        relay: Relay = start_relay({"gateway": {"host": f"127.0.0.1:{smtp_port}", "sendAll": True}})
        [got] = sink.wait_for_messages(1)
        assert b"Subject: real" in got.data
        wait_for(lambda: len(relay.events("message_quarantined")) == 2, what="both set aside")
        assert sorted(p.name for p in (spool_dir / "corrupt").iterdir()) == [
            "1a0000000000000000002.eml",
            "1a0000000000000000003.eml",
        ]
        assert relay.queued() == []
        assert target.read_bytes() == before
        assert len(sink.messages) == 1

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
        flush = subprocess.run(
            [sys.executable, "-m", "smtprelay", "queue", "--spool", str(relay.spool), "flush"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert flush.returncode == 0, flush.stderr
        assert "notified" in flush.stdout
        [got] = mx.wait_for_messages()
        assert got.recipients == ("u@later.test",)


def _delivered_id_list(sink: Sink) -> list[str]:
    """Queue ids of what reached the sink, read from the relay's Received: header."""
    with sink.lock:
        messages = list(sink.messages)
    return [m.message["Received"].split(" id ", 1)[1].split()[0].rstrip(";") for m in messages]


def _delivered_ids(sink: Sink) -> set[str]:
    return set(_delivered_id_list(sink))


def _small_disk(size_kib: int, spool: str) -> Callable[[list[str]], list[str]]:
    """Run the relay with its spool on a tmpfs of ``size_kib`` KiB, in a private mount
    namespace (unshare), so the disk really fills: no mock stands in for ENOSPC."""

    def wrap(argv: list[str]) -> list[str]:
        command = (
            f"mkdir -p {shlex.quote(spool)} && "
            f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(spool)} && "
            f"exec {shlex.join(argv)}"
        )
        return ["unshare", "--map-root-user", "--mount", "sh", "-c", command]

    return wrap


class TestFullDisk:
    def test_a_full_spool_answers_4xx_and_every_250_is_delivered(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        tmp_path: Path,
    ) -> None:
        """When the spool's disk is full the relay answers 452, never 250; every message that
        did get a 250 is delivered once the destination is reachable."""
        dns = start_dns(_zone())
        spool = tmp_path / "relay" / "spool"
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port, "queueTimer": "1s"},
            },
            wrapper=_small_disk(96, str(spool)),
        )
        accepted: set[str] = set()
        refused: list[int] = []
        body = "x" * 60 + "\n"
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("client.test")
            for i in range(300):  # bounded: the disk holds far fewer
                client.mail("alice@sender.test")
                client.rcpt(f"u{i}@later.test")
                code, reply = client.data(message("alice@sender.test", ["x"], body=body * 60))
                if code == 250:
                    accepted.add(reply.decode().rsplit(" ", 1)[-1])
                else:
                    refused.append(code)
                    assert code == 452, reply
                    if len(refused) >= 3:
                        break
        assert refused, "the disk never filled"
        assert accepted
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        wait_for(lambda: accepted <= _delivered_ids(mx), timeout=60, what="every 250'd message")
        assert _delivered_ids(mx) == accepted
        assert relay.events("refused")[-1]["reason"] == "spool_full"


class TestCrashDuringBurst:
    def test_sigkill_during_a_burst_loses_no_accepted_message(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Clients send in parallel; the relay is SIGKILLed mid-burst; after a restart every
        message that got a 250 reaches the MX."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "2s"}}
        )
        accepted: set[str] = set()
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            for i in range(100):  # bounded per client
                if stop.is_set():
                    return
                try:
                    reply = send(relay.port, "alice@sender.test", [f"c{n}m{i}@later.test"])
                except (OSError, smtplib.SMTPException, AssertionError):
                    return  # the relay died under us: that message got no 250
                with lock:
                    accepted.add(reply.rsplit(" ", 1)[-1])

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(accepted) >= 40, timeout=30, what="the burst to get going")
        relay.kill()
        stop.set()
        for thread in threads:
            thread.join(30)
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        relay.start()
        # Messages spooled whose 250 the client never saw may arrive too: at least once.
        wait_for(lambda: accepted <= _delivered_ids(mx), timeout=60, what="every 250'd message")
        ids = _delivered_id_list(mx)
        assert len(ids) == len(set(ids))  # nothing was delivered before the kill: none twice
