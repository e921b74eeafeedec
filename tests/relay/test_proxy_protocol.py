"""PROXY protocol v1/v2 from trusted load balancers: the client the policy sees, and the
refusal of PROXY from anyone else. The balancer is played by a raw socket from 127.0.0.1;
an untrusted peer connects from 127.0.0.2."""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from smtprelay.config import DEFAULT_NETWORKS

from tests.peers import Relay, wait_for

Start = Callable[..., Any]
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client: str) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode()


def v2(client: str) -> bytes:
    """PROXY v2, command PROXY, TCP over IPv4 (RFC-like spec from haproxy's proxy-protocol.txt)."""
    addresses = (
        ipaddress.IPv4Address(client).packed
        + ipaddress.IPv4Address("127.0.0.1").packed
        + struct.pack("!HH", 40000, 25)
    )
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def session(relay: Relay, header: bytes, source: str = "127.0.0.1") -> smtplib.SMTP:
    """An SMTP client whose connection starts with ``header`` (a load balancer's)."""
    sock = socket.create_connection(
        ("127.0.0.1", relay.port), timeout=10, source_address=(source, 0)
    )
    sock.sendall(header)
    client = smtplib.SMTP(timeout=10)
    client.sock = sock
    code, _ = client.getreply()
    assert code == 220
    client.ehlo("client.test")
    return client


def rcpt_code(client: smtplib.SMTP) -> int:
    client.mail("app@sender.test")
    return client.rcpt("bob@example.test")[0]


@pytest.fixture
def relay(start_relay: Start) -> Relay:
    """Only 10.0.0.0/8 may relay; 127.0.0.1 is the trusted balancer."""
    started: Relay = start_relay(
        {
            "allowedNetworks": ["10.0.0.0/8"],
            "proxyProtocol": {"trustedNetworks": ["127.0.0.1/32"]},
        }
    )
    return started


class TestProxyProtocol:
    @pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
    def test_the_named_client_is_the_one_the_policy_judges(
        self, relay: Relay, header: Callable[[str], bytes]
    ) -> None:
        """Through the balancer, 10.1.2.3 may relay and 192.0.2.7 may not."""
        with session(relay, header("10.1.2.3")) as client:
            assert rcpt_code(client) == 250
        with session(relay, header("192.0.2.7")) as client:
            assert rcpt_code(client) == 554
        wait_for(lambda: len(relay.events("proxied")) == 2, what="two proxied sessions")
        proxied = relay.events("proxied")
        assert [e["client"] for e in proxied] == ["10.1.2.3", "192.0.2.7"]
        assert {e["balancer"] for e in proxied} == {"127.0.0.1"}
        [refused] = relay.events("refused")
        assert refused["client"] == "192.0.2.7"

    def test_a_proxy_header_from_an_untrusted_peer_is_refused(self, relay: Relay) -> None:
        """From 127.0.0.2 a PROXY line is an unknown command; the claimed 10.1.2.3 counts
        for nothing and the peer itself may not relay."""
        with smtplib.SMTP("127.0.0.1", relay.port, source_address=("127.0.0.2", 0)) as client:
            code, _ = client.docmd("PROXY", "TCP4 10.1.2.3 127.0.0.1 40000 25")
            assert code == 500
            client.ehlo("client.test")
            assert rcpt_code(client) == 554
        assert relay.events("proxied") == []

    def test_a_trusted_balancer_without_a_header_gets_no_session(self, relay: Relay) -> None:
        """The balancer's connection must start with PROXY; plain SMTP from it is dropped."""
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            sock.sendall(b"EHLO client.test\r\n")
            assert sock.recv(1024) == b""  # closed without a greeting


def test_the_default_networks_leave_out_loopback() -> None:
    """A sidecar proxy connects from loopback: the default must not trust it."""
    assert not any(
        ipaddress.ip_address("127.0.0.6") in ipaddress.ip_network(n) for n in DEFAULT_NETWORKS
    )
    assert not any(ipaddress.ip_address("::1") in ipaddress.ip_network(n) for n in DEFAULT_NETWORKS)
