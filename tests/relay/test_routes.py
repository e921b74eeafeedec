"""routes (per-domain and per-sender ways out) and gateway names resolved through the
resolver's search list, against dnsmasq and aiosmtpd sinks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from smtprelay.config import ConfigError, parse_config
from smtprelay.route import choose_route, domain_matches

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]


class TestChoice:
    def test_a_leading_dot_matches_subdomains_too(self) -> None:
        """example.org matches itself only; .example.org also a.b.example.org."""
        assert domain_matches("example.org", ["example.org"])
        assert not domain_matches("a.example.org", ["example.org"])
        assert domain_matches("a.b.example.org", [".example.org"])
        assert domain_matches("example.org", [".example.org"])
        assert not domain_matches("badexample.org", [".example.org"])

    def test_first_matching_rule_wins_then_the_default(self) -> None:
        """Rules in order, senders narrowing one; no match: direct, then the gateway."""
        settings = parse_config(
            {
                "gateway": {"host": "gw.test", "triesBeforeGateway": 1},
                "routes": [
                    {"domains": ["x.test"], "senders": ["vip.test"], "via": ["vip-hub.test"]},
                    {"domains": [".x.test"], "via": ["hub.test:2525", "hub2.test"]},
                    {"domains": ["d.test"], "direct": True, "tls": "verify"},
                ],
            }
        )
        vip = choose_route(settings, "a@x.test", 1, "boss@vip.test")
        assert (vip.kind, vip.hosts) == ("route", ("vip-hub.test",))
        hub = choose_route(settings, "a@sub.X.test", 5, "someone@else.test")
        assert (hub.kind, hub.name, hub.port, hub.hosts) == (
            "route",
            "hub.test",
            2525,
            ("hub.test:2525", "hub2.test"),
        )
        direct = choose_route(settings, "a@d.test", 5)
        assert (direct.kind, direct.tls) == ("direct", "verify")
        assert choose_route(settings, "a@other.test", 1).kind == "direct"
        assert choose_route(settings, "a@other.test", 2).kind == "gateway"

    @pytest.mark.parametrize(
        "rule", [{"domains": ["a.test"]}, {"domains": ["a.test"], "via": ["h"], "direct": True}]
    )
    def test_a_route_needs_via_or_direct(self, rule: dict[str, Any]) -> None:
        """Neither, or both, is refused naming routes[0]."""
        with pytest.raises(ConfigError, match=r"routes\[0\]: .*exactly one of via"):
            parse_config({"routes": [rule]})


class TestRoutes:
    def test_recipients_of_one_message_go_their_own_ways(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """One message: a.test via one host, *.b.test via another, c.test direct (MX)."""
        dns = start_dns(
            Zone(
                a=[("hub.b.test", "127.0.0.14"), ("mx.c.test", "127.0.0.12")],
                mx=[("c.test", "mx.c.test", 10)],
            )
        )
        a_host: Sink = start_sink("127.0.0.13", smtp_port)
        b_host: Sink = start_sink("127.0.0.14", smtp_port)
        mx: Sink = start_sink("127.0.0.12", smtp_port)
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port, "queueTimer": "1h"},
                "routes": [
                    {"domains": ["a.test"], "via": [f"127.0.0.13:{smtp_port}"]},
                    {"domains": [".b.test"], "via": [f"hub.b.test:{smtp_port}"]},
                ],
            }
        )
        send(relay.port, "alice@sender.test", ["x@a.test", "y@sub.b.test", "z@c.test"])
        assert [m.recipients for m in a_host.wait_for_messages()] == [("x@a.test",)]
        assert [m.recipients for m in b_host.wait_for_messages()] == [("y@sub.b.test",)]
        assert [m.recipients for m in mx.wait_for_messages()] == [("z@c.test",)]
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        routes = {e["recipient"]: e["route"] for e in relay.events("delivery")}
        assert routes == {"x@a.test": "route", "y@sub.b.test": "route", "z@c.test": "direct"}


class TestSearchList:
    def test_a_service_short_name_resolves_through_the_search_list(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        tmp_path: Path,
    ) -> None:
        """gateway smarthost.mail with the pod's search list reaches
        smarthost.mail.svc.cluster.test, as the pod's own resolver would."""
        dns = start_dns(Zone(a=[("smarthost.mail.svc.cluster.test", "127.0.0.15")]))
        gateway: Sink = start_sink("127.0.0.15", smtp_port)
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text(
            "nameserver 127.0.0.1\n"
            "search ns1.svc.cluster.test svc.cluster.test cluster.test\n"
            "options ndots:5\n"
        )
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "gateway": {"host": f"smarthost.mail:{smtp_port}", "sendAll": True},
            },
            wrapper=lambda argv: ["env", f"SMTPRELAY_RESOLV_CONF={resolv_conf}", *argv],
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = gateway.wait_for_messages()
        assert got.recipients == ("bob@example.test",)

    def test_a_search_domain_the_server_refuses_does_not_hide_the_name_itself(
        self,
        start_dns: Start,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        tmp_path: Path,
    ) -> None:
        """ndots:5 tries gw.test.elsewhere.example first, which dnsmasq refuses (not its
        zone, no upstream); gw.test as written is still looked up and used."""
        dns = start_dns(Zone(a=[("gw.test", "127.0.0.15")]))
        gateway: Sink = start_sink("127.0.0.15", smtp_port)
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text("search elsewhere.example\noptions ndots:5\n")
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "gateway": {"host": f"gw.test:{smtp_port}", "sendAll": True},
            },
            wrapper=lambda argv: ["env", f"SMTPRELAY_RESOLV_CONF={resolv_conf}", *argv],
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = gateway.wait_for_messages()
        assert got.recipients == ("bob@example.test",)
