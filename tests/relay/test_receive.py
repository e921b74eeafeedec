"""The front door: relay policy, size, addresses, loops — each refusal a 5xx with a reason."""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import message, send

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(
        mx=[("example.test", "mx1.example.test", 10)],
        a=[("mx1.example.test", "127.0.0.2"), ("mailhost.test", "127.0.0.5")],
    )


def _client(relay: Relay, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.port, source_address=(source, 0), timeout=30)
    client.ehlo("client.test")
    return client


class TestRelayPolicy:
    def test_client_outside_allowed_networks_cannot_relay(self, start_relay: Start) -> None:
        """554 5.7.1 at RCPT for an address outside allowedNetworks; the session goes on."""
        relay = start_relay({"allowedNetworks": ["127.0.0.1/32"]})
        with _client(relay, source="127.0.0.55") as client:
            client.mail("alice@sender.test")
            code, text = client.rcpt("bob@example.test")
            assert code == 554
            assert b"5.7.1" in text
            assert client.noop()[0] == 250
        assert relay.queued() == []
        [refusal] = relay.events("refused")
        assert refusal["client"] == "127.0.0.55"

    def test_client_inside_allowed_networks_may_relay(self, start_relay: Start) -> None:
        """The same relay accepts the client whose address is listed."""
        relay = start_relay({"allowedNetworks": ["127.0.0.1/32"]})
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        assert len(relay.queued()) == 1


class TestSize:
    def test_size_is_advertised_and_enforced(self, start_relay: Start) -> None:
        """EHLO advertises SIZE; a larger message gets 552 and the session goes on."""
        relay = start_relay({"maxMessageSize": "10Ki"})
        with _client(relay) as client:
            assert client.esmtp_features["size"] == str(10 * 1024)
            client.mail("alice@sender.test")
            client.rcpt("bob@example.test")
            code, text = client.data(
                message("alice@sender.test", ["bob"], body="x" * 900 + "\n") * 20
            )
            assert code == 552, text
            assert b"5.3.4" in text
            assert client.noop()[0] == 250
        assert relay.queued() == []

    def test_declared_size_over_the_limit_is_refused_at_mail(self, start_relay: Start) -> None:
        """MAIL FROM with SIZE= beyond the limit is refused before any data is sent."""
        relay = start_relay({"maxMessageSize": "10Ki"})
        with _client(relay) as client:
            code, _ = client.mail("alice@sender.test", ["SIZE=20000"])
            assert code == 552


class TestAddresses:
    def test_bare_user_goes_to_the_default_mail_host(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """RCPT TO:<alice> is delivered as alice@<defaultMailHost> to that host."""
        dns = start_dns(_zone())
        mailhost: Sink = start_sink("127.0.0.5", smtp_port)
        relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port},
                "defaultMailHost": "mailhost.test",
            }
        )
        send(relay.port, "bob@sender.test", ["alice"])
        [got] = mailhost.wait_for_messages()
        assert got.recipients == ("alice@mailhost.test",)

    def test_bare_user_without_default_mail_host_is_refused(self, start_relay: Start) -> None:
        """550 5.1.3 at RCPT when no defaultMailHost is set."""
        relay = start_relay({})
        with _client(relay) as client:
            client.mail("bob@sender.test")
            code, text = client.rcpt("alice")
            assert code == 550
            assert b"5.1.3" in text
            assert client.rcpt("alice@example.test")[0] == 250

    @pytest.mark.parametrize(
        "address", ["bob@", "bob@@example.test", "bob@-bad-.test", "@example.test"]
    )
    def test_bad_recipient_syntax_gets_5xx(self, start_relay: Start, address: str) -> None:
        """A malformed address gets a 5xx naming it; the session continues."""
        relay = start_relay({})
        with _client(relay) as client:
            client.mail("bob@sender.test")
            code, _ = client.docmd("RCPT", f"TO:<{address}>")
            assert 500 <= code < 600
            assert client.rcpt("ok@example.test")[0] == 250

    def test_bad_command_gets_5xx_and_the_session_goes_on(self, start_relay: Start) -> None:
        """Unknown verbs and broken syntax get 5xx; a message can still be sent after."""
        relay = start_relay({})
        with _client(relay) as client:
            assert 500 <= client.docmd("FROBNICATE")[0] < 600
            assert 500 <= client.docmd("MAIL", "FROM alice")[0] < 600
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        assert len(relay.queued()) == 1

    def test_overlong_line_gets_5xx(self, start_relay: Start) -> None:
        """A DATA line over 1000 octets is refused with 500 and nothing is queued."""
        relay = start_relay({})
        with _client(relay) as client:
            client.mail("alice@sender.test")
            client.rcpt("bob@example.test")
            code, _ = client.data(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n")
            assert code == 500
            assert client.noop()[0] == 250
        assert relay.queued() == []


class TestTrace:
    def test_a_mail_loop_is_refused(self, start_relay: Start) -> None:
        """A message that already carries more than 50 Received: headers is refused."""
        relay = start_relay({})
        hops = b"".join(b"Received: from hop%d by hop%d\r\n" % (i, i) for i in range(51))
        with _client(relay) as client:
            client.mail("alice@sender.test")
            client.rcpt("bob@example.test")
            code, text = client.data(hops + b"Subject: loop\r\n\r\nbody\r\n")
            assert code == 554, text
        assert relay.queued() == []

    def test_swaks_relays_through_and_gets_the_queue_id(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """swaks, a real SMTP client, sends a message that reaches the MX."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay = start_relay({"dnsServers": [dns.server], "delivery": {"port": smtp_port}})
        result = subprocess.run(
            [
                "swaks",
                "--server",
                "127.0.0.1",
                "--port",
                str(relay.port),
                "--from",
                "alice@sender.test",
                "--to",
                "bob@example.test",
                "--header",
                "Subject: via swaks",
                "--silent",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        [got] = mx.wait_for_messages()
        assert got.message["Subject"] == "via swaks"
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
