"""Faults inside the relay and its spool: every attempt counts, strays never kill a worker,
one relay owns a spool, configuration faults defer."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.peers import Certificates, Relay, Sink, Zone, free_port, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(
        mx=[("example.test", "mx.example.test", 10), ("sender.test", "mx.sender.test", 10)],
        a=[("mx.example.test", "127.0.0.2"), ("mx.sender.test", "127.0.0.6")],
    )


def _spool_message(spool: Path, queue_id: str, recipients: list[str]) -> None:
    """A queue file as an older relay (one that checked less at RCPT) would have left it."""
    (spool / "queue").mkdir(parents=True, exist_ok=True)
    envelope = {
        "id": queue_id,
        "sender": "alice@sender.test",
        "recipients": recipients,
        "received": 1.0,
        "client": "127.0.0.1",
    }
    body = b"Subject: old\r\nMessage-ID: <old@client.test>\r\n\r\nbody\r\n"
    (spool / "queue" / f"{queue_id}.eml").write_bytes(json.dumps(envelope).encode() + b"\n" + body)


class TestEveryAttemptCounts:
    def test_a_recipient_delivery_cannot_handle_ends_returned(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        tmp_path: Path,
    ) -> None:
        """A spooled recipient whose domain is over 255 octets makes routing raise; that
        attempt counts, the good recipient is delivered once, the bad one bounced after
        `tries` — not a new copy on every queue-timer tick."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        sender_mx: Sink = start_sink("127.0.0.6", smtp_port)
        long_domain = ".".join(["a" * 60] * 5) + ".test"
        _spool_message(
            tmp_path / "relay" / "spool",
            "00000000001aaaaaaaaaa",
            ["good@example.test", f"bad@{long_domain}", "c\x01d@example.test"],
        )
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port, "queueTimer": "1s", "tries": 3},
            }
        )
        reports = sender_mx.wait_for_messages(2, timeout=30)
        wait_for(lambda: relay.queued() == [], timeout=30, what="the message to be settled")
        assert [m.recipients for m in mx.messages] == [("good@example.test",)]
        first, last = (list(r.message.iter_parts())[1].as_string() for r in reports)
        assert "c d@example.test" in first  # aiosmtplib will not send it: failed at once
        assert "NameTooLong" in last  # routing raised on every attempt: failed after the last
        attempts = {e["attempt"] for e in relay.events("delivery") if "bad@" in e["recipient"]}
        assert attempts == {1, 2, 3}

    def test_an_unreadable_message_is_set_aside_and_counted(
        self, start_relay: Start, tmp_path: Path
    ) -> None:
        """A queue file that is not an envelope moves to corrupt/, is logged and counted;
        the relay keeps serving."""
        queue = tmp_path / "relay" / "spool" / "queue"
        queue.mkdir(parents=True)
        (queue / "00000000001bbbbbbbbbb.eml").write_bytes(b"\x00\xffnot json\n")
        relay: Relay = start_relay({})
        wait_for(lambda: relay.events("message_quarantined"), what="the quarantine")
        assert (relay.spool / "corrupt" / "00000000001bbbbbbbbbb.eml").exists()
        assert relay.queued() == []
        assert "smtprelay_spool_corrupt_files 1.0" in relay.metrics()
        assert relay.ready()


class TestStrayFiles:
    def test_a_stray_file_never_stops_the_workers(self, start_relay: Start, tmp_path: Path) -> None:
        """backup.eml in the queue is set aside at start; both workers serve."""
        queue = tmp_path / "relay" / "spool" / "queue"
        queue.mkdir(parents=True)
        (queue / "backup.eml").write_bytes(b"From: me\r\n\r\nmine\r\n")
        relay: Relay = start_relay({"workers": 2})
        wait_for(lambda: len(relay.events("started")) == 2, what="both workers")
        assert (relay.spool / "corrupt" / "backup.eml").exists()
        assert relay.ready()
        assert "smtprelay_spool_corrupt_files 1.0" in relay.metrics()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class TestOneRelayOneSpool:
    def test_workers_end_with_their_supervisor(self, start_relay: Start) -> None:
        """SIGKILL of `smtprelay serve` with workers: 2 leaves no worker accepting mail."""
        relay: Relay = start_relay({"workers": 2})
        assert relay.process is not None
        supervisor = relay.process.pid
        workers = wait_for(lambda: _children(supervisor), what="the worker processes")
        assert len(workers) == 2
        relay.kill()
        wait_for(lambda: not any(_alive(pid) for pid in workers), what="the workers to end")
        relay.start()  # the spool is free again at once
        assert relay.ready()

    def test_a_second_relay_on_a_held_spool_refuses_to_start(
        self, start_relay: Start, tmp_path: Path
    ) -> None:
        """A start over a spool that live processes hold exits 1 naming the spool."""
        relay: Relay = start_relay({"workers": 2})
        other = relay.config | {
            "listen": f"127.0.0.1:{free_port()}",
            "metricsListen": f"127.0.0.1:{free_port()}",
        }
        config = tmp_path / "second.yaml"
        config.write_text(json.dumps(other))
        second = subprocess.run(
            [sys.executable, "-m", "smtprelay", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert "in use by another relay" in second.stdout + second.stderr
        assert relay.ready()


class TestConfigurationFaults:
    def test_a_gateway_that_does_not_resolve_defers(
        self, start_dns: Start, start_relay: Start
    ) -> None:
        """gateway.host naming nothing (NXDOMAIN) defers the mail; no report is sent."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "gateway": {"host": "nowhere.test", "sendAll": True}}
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [attempt] = wait_for(lambda: relay.events("delivery"), what="the attempt")
        assert attempt["outcome"] == "deferred"
        assert attempt["reply"].startswith("451 4.1.2")
        assert not relay.events("bounced")
        assert len(relay.queued()) == 1

    def test_a_failed_starttls_handshake_is_retried_in_plaintext(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        tmp_path: Path,
    ) -> None:
        """An MX that offers STARTTLS but fails the handshake (it demands a client
        certificate) gets the message in plaintext within the same attempt (RFC 7435)."""
        certificates = Certificates(tmp_path / "certs", names=("mx.example.test",))
        context = certificates.server_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # the refusal comes in the handshake
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certificates.ca_file)
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port, tls_context=context)
        relay: Relay = start_relay({"dnsServers": [dns.server], "delivery": {"port": smtp_port}})
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = mx.wait_for_messages()
        assert got.recipients == ("bob@example.test",)
        [attempt] = relay.events("delivery")
        assert attempt["outcome"] == "delivered"
        assert attempt["attempt"] == 1
