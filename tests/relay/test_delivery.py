"""Routing and delivery against real peers: dnsmasq for MX/A, aiosmtpd sinks for the hosts."""

from __future__ import annotations

import functools
import smtplib
from collections.abc import Callable
from typing import Any

import pytest

from tests.peers import Dnsmasq, Relay, Sink, Zone, wait_for
from tests.relay.mail import message, send

Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(
        mx=[
            ("example.test", "mx1.example.test", 10),
            ("later.test", "mx.later.test", 10),
            ("sender.test", "mx.sender.test", 10),
        ],
        a=[
            ("mx1.example.test", "127.0.0.2"),
            ("aonly.test", "127.0.0.3"),
            ("mx.later.test", "127.0.0.4"),
            ("mx.sender.test", "127.0.0.6"),
        ],
    )


def _relay(start_relay: Start, dns: Dnsmasq, port: int, **settings: Any) -> Relay:
    config: dict[str, Any] = {"dnsServers": [dns.server], "delivery": {"port": port}}
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    relay: Relay = start_relay(config)
    return relay


def _logged(relay: Relay, event: str, count: int) -> bool:
    return len(relay.events(event)) == count


def _gateway_relay(start_relay: Start, dns: Dnsmasq, port: int, **settings: Any) -> Relay:
    """A relay sending all mail to the gateway sink at 127.0.0.9."""
    gateway = {"host": f"127.0.0.9:{port}", "sendAll": True}
    return _relay(start_relay, dns, port, gateway=gateway, **settings)


class TestDirect:
    def test_delivers_to_the_mx_host(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A recipient's mail goes to the host its domain's MX record names."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay = _relay(start_relay, dns, smtp_port)
        reply = send(relay.port, "alice@sender.test", ["bob@example.test"], subject="direct")
        assert "queued as" in reply
        [got] = mx.wait_for_messages()
        assert got.sender == "alice@sender.test"
        assert got.recipients == ("bob@example.test",)
        assert got.message["Subject"] == "direct"
        assert "by relay.test (smtprelay)" in got.message["Received"]
        wait_for(lambda: relay.queued() == [], what="the spool to empty")

    def test_delivers_to_the_address_of_a_domain_without_mx(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """With no MX record the domain's own A record is the mail host (RFC 5321 §5.1)."""
        dns = start_dns(_zone())
        host: Sink = start_sink("127.0.0.3", smtp_port)
        relay = _relay(start_relay, dns, smtp_port)
        send(relay.port, "alice@sender.test", ["carol@aonly.test"])
        [got] = host.wait_for_messages()
        assert got.recipients == ("carol@aonly.test",)

    def test_one_connection_carries_all_recipients_of_a_host(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Recipients at the same destination share one transaction."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay = _relay(start_relay, dns, smtp_port)
        send(relay.port, "alice@sender.test", ["a@example.test", "b@example.test"])
        [got] = mx.wait_for_messages()
        assert sorted(got.recipients) == ["a@example.test", "b@example.test"]

    def test_deferred_mail_is_delivered_when_the_mx_comes_up(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A refused connection defers; the next queue-timer attempt delivers."""
        dns = start_dns(_zone())
        relay = _relay(start_relay, dns, smtp_port, delivery={"queueTimer": "1s"})
        send(relay.port, "alice@sender.test", ["dave@later.test"])
        wait_for(
            lambda: any(e["outcome"] == "deferred" for e in relay.events("delivery")),
            what="a deferred attempt",
        )
        assert len(relay.queued()) == 1
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        [got] = mx.wait_for_messages()
        assert got.recipients == ("dave@later.test",)
        wait_for(lambda: relay.events("delivery")[-1]["outcome"] == "delivered", what="the log")
        outcomes = [(e["attempt"], e["outcome"]) for e in relay.events("delivery")]
        assert outcomes[-1][1] == "delivered"
        assert outcomes[-1][0] >= 2
        wait_for(lambda: relay.queued() == [], what="the spool to empty")

    def test_a_4xx_reply_defers_and_a_later_attempt_delivers(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """451 at RCPT is temporary: the message stays queued and is tried again."""
        dns = start_dns(_zone())
        replies = iter(["451 4.3.0 try later"])
        mx: Sink = start_sink(
            "127.0.0.2", smtp_port, rcpt_reply=lambda _a: next(replies, "250 2.1.5 OK")
        )
        relay = _relay(start_relay, dns, smtp_port, delivery={"queueTimer": "1s"})
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        mx.wait_for_messages()
        wait_for(lambda: len(relay.events("delivery")) >= 2, what="two logged attempts")
        attempts = [(e["attempt"], e["outcome"]) for e in relay.events("delivery")]
        assert attempts[:2] == [(1, "deferred"), (2, "delivered")]


class TestGateway:
    def test_gateway_takes_over_after_tries_before_gateway(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Attempts 1..triesBeforeGateway go direct; the next one goes to the gateway."""
        dns = start_dns(_zone())
        gateway: Sink = start_sink("127.0.0.9", smtp_port + 1 if smtp_port < 65000 else 2526)
        relay = _relay(
            start_relay,
            dns,
            smtp_port,
            delivery={"queueTimer": "1s", "tries": 5},
            gateway={"host": f"127.0.0.9:{gateway.port}", "triesBeforeGateway": 2},
        )
        send(relay.port, "alice@sender.test", ["dave@later.test"])
        [got] = gateway.wait_for_messages()
        assert got.recipients == ("dave@later.test",)
        wait_for(lambda: len(relay.events("delivery")) >= 3, what="three logged attempts")
        routes = [(e["attempt"], e["route"], e["outcome"]) for e in relay.events("delivery")]
        assert routes == [
            (1, "direct", "deferred"),
            (2, "direct", "deferred"),
            (3, "gateway", "delivered"),
        ]

    def test_send_all_sends_every_attempt_through_the_gateway(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """With sendAll the MX is never contacted, even when it is up."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        gateway: Sink = start_sink("127.0.0.9", smtp_port)
        relay = _gateway_relay(start_relay, dns, smtp_port)
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = gateway.wait_for_messages()
        assert got.recipients == ("bob@example.test",)
        wait_for(lambda: relay.events("delivery"), what="the logged attempt")
        assert [e["route"] for e in relay.events("delivery")] == ["gateway"]
        assert mx.messages == []


class TestAfterThe250:
    def test_a_client_that_stays_silent_after_its_250_does_not_hold_its_mail_back(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """What follows a 250 (the `accepted` line, letting go of the file, which starts
        its delivery) waits at most for the client's next command; a client that keeps
        the session open and says nothing more still has its message logged and
        delivered, and two messages on one session both arrive."""
        dns = start_dns(_zone())
        gateway: Sink = start_sink("127.0.0.9", smtp_port)
        relay = _gateway_relay(start_relay, dns, smtp_port)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("client.test")
            for number in (1, 2):
                subject = f"silent after {number}"
                data = message("alice@sender.test", ["bob@example.test"], subject)
                client.sendmail("alice@sender.test", ["bob@example.test"], data)
                got = gateway.wait_for_messages(number, timeout=10)
                assert got[-1].message["Subject"] == subject
                wait_for(
                    functools.partial(_logged, relay, "accepted", number),
                    timeout=10,
                    what="the accepted line while the session is open",
                )
            assert client.noop()[0] == 250  # the session is still open
        wait_for(lambda: relay.queued() == [], what="the spool to empty")


class TestConnectionCache:
    def test_messages_to_one_host_share_a_session(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Back-to-back messages to the gateway travel on one connection, as Postfix's
        connection cache does."""
        dns = start_dns(_zone())
        gateway: Sink = start_sink("127.0.0.9", smtp_port)
        relay = _gateway_relay(start_relay, dns, smtp_port, delivery={"concurrency": 1})
        for number in range(3):
            send(relay.port, "alice@sender.test", [f"r{number}@example.test"])
        got = gateway.wait_for_messages(3)
        assert sorted(r for m in got for r in m.recipients) == [
            "r0@example.test",
            "r1@example.test",
            "r2@example.test",
        ]
        assert len({m.source for m in got}) == 1, [m.source for m in got]

    def test_a_session_the_host_dropped_is_replaced(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """A cached session whose server went away fails its RSET and is closed; the
        message goes out on a new connection in the same attempt."""
        dns = start_dns(_zone())
        first: Sink = start_sink("127.0.0.9", smtp_port)
        relay = _gateway_relay(start_relay, dns, smtp_port)
        send(relay.port, "alice@sender.test", ["one@example.test"])
        first.wait_for_messages(1)
        wait_for(lambda: relay.queued() == [], what="the first message to leave the spool")
        first.stop()  # closes the session the relay keeps
        second: Sink = start_sink("127.0.0.9", smtp_port)
        send(relay.port, "alice@sender.test", ["two@example.test"])
        [got] = second.wait_for_messages(1)
        assert got.recipients == ("two@example.test",)
        attempts = [e for e in relay.events("delivery") if e["recipient"] == "two@example.test"]
        assert [e["outcome"] for e in attempts] == ["delivered"]

    @pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
    def test_a_session_the_host_timed_out_is_replaced_within_the_attempt(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        pipelining: bool,
    ) -> None:
        """A gateway that ends a cached session (421 to the next MAIL, then closes; pipelined,
        the rest of the batch is left unanswered) costs the message no deferral: it goes out
        at once on a new connection."""
        dns = start_dns(_zone())
        gateway: Sink = start_sink(
            "127.0.0.9", smtp_port, mails_per_session=1, pipelining=pipelining
        )
        relay = _gateway_relay(
            start_relay, dns, smtp_port, delivery={"concurrency": 1, "queueTimer": "1h"}
        )
        for number in range(3):
            send(relay.port, "alice@sender.test", [f"r{number}@example.test"])
        gateway.wait_for_messages(3)
        wait_for(lambda: len(relay.events("delivery")) == 3, what="3 attempts logged")
        assert [e["outcome"] for e in relay.events("delivery")] == ["delivered"] * 3
        assert len({m.source for m in gateway.messages}) == 3

    @pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
    def test_a_session_left_mid_transaction_is_reset_before_reuse(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        pipelining: bool,
    ) -> None:
        """A transaction whose every recipient was refused (pipelined: DATA refused in the
        same batch) leaves MAIL open on the server; the next message on that session is
        preceded by RSET (else: 503 nested MAIL)."""
        dns = start_dns(_zone())
        gateway: Sink = start_sink(
            "127.0.0.9",
            smtp_port,
            pipelining=pipelining,
            rcpt_reply=lambda address: "550 5.1.1 no" if address.startswith("gone") else "250 OK",
        )
        relay = _gateway_relay(start_relay, dns, smtp_port, delivery={"concurrency": 1})
        send(relay.port, "alice@sender.test", ["gone@example.test"])
        wait_for(lambda: relay.events("delivery"), what="the refused attempt")
        send(relay.port, "alice@sender.test", ["here@example.test"])
        wait_for(
            lambda: any(m.recipients == ("here@example.test",) for m in gateway.messages),
            what="the second message at the gateway",
        )
        # the bounce for gone@ to alice@ and the message to here@ both got through
        others = [e for e in relay.events("delivery") if e["recipient"] != "gone@example.test"]
        assert sorted(e["recipient"] for e in others) == ["alice@sender.test", "here@example.test"]
        assert [e["outcome"] for e in others] == ["delivered", "delivered"]


class TestConcurrency:
    def test_deliveries_in_flight_are_bounded_by_concurrency(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """With delivery.concurrency 2 and a slow MX, never more than two deliveries at once."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port, data_delay=0.3)
        relay = _relay(start_relay, dns, smtp_port, delivery={"concurrency": 2})
        for i in range(8):
            send(relay.port, "alice@sender.test", [f"u{i}@example.test"])
        mx.wait_for_messages(8)
        assert mx.most_active == 2
