"""TLS policy towards gateways and MX hosts, and gateway failover: aiosmtpd peers with
trustme certificates, found through dnsmasq by name, as in production."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from smtprelay.config import ConfigError, parse_config

from tests.peers import Certificates, Dnsmasq, Relay, Sink, Zone, free_port, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]
GATEWAY = "gw.test"


class Login:
    """An aiosmtpd authenticator for one user that records every AUTH it is given."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        with self._lock:
            self.calls.append(data.password if isinstance(data, LoginPassword) else b"?")
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"relay",
            b"gw-secret",
        )
        return AuthResult(success=ok, auth_data=data)


def _server_context(certs: Certificates, seen: list[str]) -> ssl.SSLContext:
    """The gateway's TLS, remembering the SNI names clients send."""
    context = certs.server_context()

    def remember(_socket: Any, name: str | None, _context: Any) -> None:
        seen.append(name or "")

    context.sni_callback = remember
    return context


def _credentials(tmp_path: Path) -> Path:
    directory = tmp_path / "gateway-credentials"
    directory.mkdir(exist_ok=True)
    (directory / "username").write_text("relay\n")
    (directory / "password").write_text("gw-secret\n")
    return directory


@pytest.fixture
def dns(start_dns: Start) -> Dnsmasq:
    server: Dnsmasq = start_dns(
        Zone(
            a=[
                (GATEWAY, "127.0.0.9"),
                ("gw2.test", "127.0.0.10"),
                ("dead.test", "127.0.0.11"),
                ("mx.example.test", "127.0.0.12"),
            ],
            mx=[("example.test", "mx.example.test", 10)],
        )
    )
    return server


def _gateway_relay(
    start_relay: Start, dns: Dnsmasq, tmp_path: Path, hosts: list[str], **gateway: Any
) -> Relay:
    relay: Relay = start_relay(
        {
            "dnsServers": [dns.server],
            "gateway": {
                "hosts": hosts,
                "sendAll": True,
                "credentialsFile": str(_credentials(tmp_path)),
                **gateway,
            },
            "delivery": {"queueTimer": "1h"},
        }
    )
    return relay


def _gateway(start_sink: Start, host: str, port: int, login: Login, **tls: Any) -> Sink:
    """An aiosmtpd gateway requiring AUTH, with the TLS options given."""
    sink: Sink = start_sink(host, port, authenticator=login, auth_required=True, **tls)
    return sink


def _first_attempt(relay: Relay) -> dict[str, Any]:
    events: list[dict[str, Any]] = wait_for(
        lambda: relay.events("delivery"), what="the first delivery attempt"
    )
    return events[0]


class TestVerify:
    def test_a_verified_gateway_gets_sni_auth_and_the_mail(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, tmp_path: Path
    ) -> None:
        """Credentials imply tls verify: chain and name check against caFile, SNI gw.test."""
        certs = Certificates(tmp_path / "gw", names=(GATEWAY,))
        seen: list[str] = []
        login = Login()
        port = free_port("127.0.0.9")
        gateway = _gateway(
            start_sink, "127.0.0.9", port, login, tls_context=_server_context(certs, seen)
        )
        relay = _gateway_relay(
            start_relay, dns, tmp_path, [f"{GATEWAY}:{port}"], caFile=str(certs.ca_file)
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = gateway.wait_for_messages()
        assert got.login == "relay"
        assert seen == [GATEWAY]
        attempt = _first_attempt(relay)
        assert (attempt["outcome"], attempt["tls"]) == ("delivered", "verified")

    @pytest.mark.parametrize("problem", ["wrong name", "unknown CA"])
    def test_an_unverifiable_gateway_defers_and_never_gets_the_password(
        self, problem: str, dns: Dnsmasq, start_sink: Start, start_relay: Start, tmp_path: Path
    ) -> None:
        """A certificate for another name, or from a CA the relay does not trust: deferred,
        and no AUTH ever reaches the gateway."""
        trusted = Certificates(tmp_path / "trusted", names=("other.test",))
        served = (
            trusted
            if problem == "wrong name"
            else Certificates(tmp_path / "rogue", names=(GATEWAY,))
        )
        login = Login()
        port = free_port("127.0.0.9")
        gateway = _gateway(
            start_sink, "127.0.0.9", port, login, tls_context=served.server_context()
        )
        relay = _gateway_relay(
            start_relay, dns, tmp_path, [f"{GATEWAY}:{port}"], caFile=str(trusted.ca_file)
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        attempt = _first_attempt(relay)
        assert attempt["outcome"] == "deferred"
        assert "certificate" in attempt["reply"].lower()
        assert login.calls == []
        assert gateway.messages == []
        assert len(relay.queued()) == 1

    def test_a_gateway_without_starttls_never_gets_the_password(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, tmp_path: Path
    ) -> None:
        """AUTH offered in plaintext is not taken: deferred, naming the missing STARTTLS."""
        login = Login()
        port = free_port("127.0.0.9")
        gateway: Sink = start_sink(
            "127.0.0.9", port, authenticator=login, auth_required=True, auth_require_tls=False
        )
        relay = _gateway_relay(start_relay, dns, tmp_path, [f"{GATEWAY}:{port}"])
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        attempt = _first_attempt(relay)
        assert attempt["outcome"] == "deferred"
        assert "STARTTLS" in attempt["reply"]
        assert login.calls == []
        assert gateway.messages == []

    def test_implicit_tls_on_port_465_style_listener(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, tmp_path: Path
    ) -> None:
        """implicitTls: TLS from the first byte (RFC 8314), verified, then AUTH and the mail."""
        certs = Certificates(tmp_path / "gw", names=(GATEWAY,))
        seen: list[str] = []
        login = Login()
        port = free_port("127.0.0.9")
        gateway = _gateway(
            start_sink,
            "127.0.0.9",
            port,
            login,
            ssl_context=_server_context(certs, seen),
            auth_require_tls=False,  # aiosmtpd counts only STARTTLS as TLS; this is TLS already
        )
        relay = _gateway_relay(
            start_relay,
            dns,
            tmp_path,
            [f"{GATEWAY}:{port}"],
            caFile=str(certs.ca_file),
            implicitTls=True,
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = gateway.wait_for_messages()
        assert got.login == "relay"
        assert seen[-1] == GATEWAY  # (the Controller's own readiness probe sends no SNI)
        assert _first_attempt(relay)["tls"] == "verified"


class TestFailover:
    def test_a_dead_first_gateway_hands_over_to_the_second_in_one_attempt(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, tmp_path: Path
    ) -> None:
        """hosts [dead, 4xx, live]: the third delivers, on attempt 1."""
        certs = Certificates(tmp_path / "gw", names=(GATEWAY, "gw2.test"))
        port = free_port("127.0.0.9")
        busy = _gateway(
            start_sink,
            "127.0.0.10",
            port,
            Login(),
            tls_context=certs.server_context(),
            rcpt_reply="451 4.3.2 busy, try another",
        )
        live = _gateway(start_sink, "127.0.0.9", port, Login(), tls_context=certs.server_context())
        relay = _gateway_relay(
            start_relay,
            dns,
            tmp_path,
            [f"dead.test:{port}", f"gw2.test:{port}", f"{GATEWAY}:{port}"],
            caFile=str(certs.ca_file),
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = live.wait_for_messages()
        assert got.recipients == ("bob@example.test",)
        assert busy.messages == []
        attempt = _first_attempt(relay)
        assert (attempt["attempt"], attempt["outcome"], attempt["host_name"]) == (
            1,
            "delivered",
            GATEWAY,
        )
        wait_for(lambda: relay.queued() == [], what="the spool to empty")


class TestMxTls:
    def test_a_broken_starttls_falls_back_to_plaintext_in_the_same_attempt(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """delivery.tls may: a handshake that fails is followed by plaintext on attempt 1."""
        broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
        mx: Sink = start_sink("127.0.0.12", smtp_port, tls_context=broken)
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port, "queueTimer": "1h"}}
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = mx.wait_for_messages()
        assert got.recipients == ("bob@example.test",)
        attempt = _first_attempt(relay)
        assert (attempt["attempt"], attempt["outcome"], attempt["tls"]) == (1, "delivered", "")

    def test_delivery_tls_verify_refuses_an_mx_without_a_trusted_certificate(
        self, dns: Dnsmasq, start_sink: Start, start_relay: Start, smtp_port: int, tmp_path: Path
    ) -> None:
        """delivery.tls verify: an MX with a self-signed (unknown CA) certificate defers."""
        certs = Certificates(tmp_path / "mx", names=("mx.example.test",))
        mx: Sink = start_sink("127.0.0.12", smtp_port, tls_context=certs.server_context())
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port, "queueTimer": "1h", "tls": "verify"},
            }
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        attempt = _first_attempt(relay)
        assert attempt["outcome"] == "deferred"
        assert mx.messages == []


class TestConfig:
    def test_host_and_hosts_together_is_an_error_naming_both(self) -> None:
        """One way to say where the gateway is."""
        with pytest.raises(ConfigError) as error:
            parse_config({"gateway": {"host": "a.test", "hosts": ["b.test"]}})
        assert "gateway.host and gateway.hosts" in str(error.value)

    @pytest.mark.parametrize("level", ["none", "may"])
    def test_credentials_over_an_unverified_channel_are_refused(self, level: str) -> None:
        """tls none/may with credentialsFile would expose the password: a config error."""
        with pytest.raises(ConfigError, match=r"gateway: gateway.tls .* credentialsFile"):
            parse_config({"gateway": {"host": "a.test", "tls": level, "credentialsFile": "/x"}})

    def test_the_gateway_level_defaults_to_verify_with_credentials(self) -> None:
        """verify when credentials are set, else may; gateway.host is a one-entry list."""
        with_credentials = parse_config({"gateway": {"host": "a.test", "credentialsFile": "/x"}})
        assert with_credentials.gateway.tls_level == "verify"
        assert with_credentials.gateway.targets == ["a.test"]
        assert parse_config({"gateway": {"host": "a.test"}}).gateway.tls_level == "may"
