"""relay.yaml: every key in DESIGN.md, durations and host:port parsing, errors naming fields."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from smtprelay.config import ConfigError, parse_config, parse_duration, parse_quantity


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "smtprelay", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "seconds"), [("1s", 1), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400)]
    )
    def test_durations(self, text: str, seconds: float) -> None:
        """Durations read the way Kubernetes users write them."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "30", "1d", "-1s", "m", "0s"])
    def test_bad_durations(self, text: str) -> None:
        """Anything else is an error, not a guess."""
        with pytest.raises(ValueError, match=r"duration|positive"):
            parse_duration(text)

    @pytest.mark.parametrize(("text", "size"), [("25Mi", 25 * 2**20), ("10M", 10**7), (1000, 1000)])
    def test_quantities(self, text: str | int, size: int) -> None:
        """maxMessageSize takes Kubernetes quantities."""
        assert parse_quantity(text) == size

    def test_every_design_key_is_accepted(self) -> None:
        """A relay.yaml using every documented key validates."""
        config = parse_config(
            {
                "hostname": "relay.example.com",
                "allowedNetworks": ["10.0.0.0/8", "fd00::/8"],
                "maxMessageSize": "10Mi",
                "defaultMailHost": "mail.example.com",
                "dnsServers": ["10.0.0.10", "127.0.0.1:5353", "[::1]:53"],
                "delivery": {"tries": 144, "queueTimer": "30m", "port": 2525},
                "gateway": {"host": "smarthost:587", "triesBeforeGateway": 3},
                "logging": {
                    "target": "syslog",
                    "syslogServer": "logs:514",
                    "debug": True,
                    "retentionDays": 7,
                },
                "listen": "0.0.0.0:2525",
                "spoolDir": "/var/spool/smtprelay",
                "metricsListen": "0.0.0.0:9090",
                "tls": {"certFile": "/tls/tls.crt", "keyFile": "/tls/tls.key"},
                "auth": {"usersFile": "/auth/users"},
            }
        )
        assert config.delivery.queue_timer == 1800
        assert config.max_message_size == 10 * 2**20
        assert config.gateway.tries_before_gateway == 3

    def test_every_contract_addition_is_accepted(self) -> None:
        """gateway.hosts/tls/implicitTls/caFile, delivery.tls/delayWarning, routes and
        proxyProtocol.trustedNetworks, as DESIGN.md's contract additions name them."""
        config = parse_config(
            {
                "delivery": {"tls": "encrypt", "delayWarning": "4h"},
                "gateway": {
                    "hosts": ["gw1.example:587", "gw2.example"],
                    "tls": "verify",
                    "implicitTls": True,
                    "caFile": "/ca/ca.crt",
                    "credentialsFile": "/gw",
                },
                "routes": [
                    {
                        "domains": ["a.example", ".b.example"],
                        "senders": ["billing.example"],
                        "via": ["hub.example:2525"],
                        "tls": "encrypt",
                        "caFile": "/ca/b.crt",
                        "credentialsFile": "/b",
                    },
                    {"domains": ["c.example"], "direct": True},
                ],
                "proxyProtocol": {"trustedNetworks": ["10.0.0.5/32"]},
            }
        )
        assert config.delivery.delay_warning == 4 * 3600
        assert config.gateway.targets == ["gw1.example:587", "gw2.example"]
        assert config.routes[1].direct
        assert config.proxy_protocol.trusted_networks == ["10.0.0.5/32"]
        assert parse_config({}).delivery.delay_warning == 0

    def test_defaults_match_the_design(self) -> None:
        """An empty file gives the documented defaults."""
        config = parse_config({})
        assert (config.delivery.tries, config.delivery.queue_timer, config.delivery.port) == (
            20,
            1800,
            25,
        )
        assert config.max_message_size == 25 * 2**20
        assert config.logging.target == "file"
        assert config.listen == "0.0.0.0:2525"
        assert "fc00::/7" in config.allowed_networks

    @pytest.mark.parametrize(
        ("document", "field"),
        [
            ({"delivery": {"queueTimer": "soon"}}, "delivery.queueTimer"),
            ({"delivery": {"tries": 0}}, "delivery.tries"),
            ({"gateway": {"sendAll": True}}, "gateway"),
            ({"gateway": {"host": "gw", "triesBeforeGateway": 20}}, "(top level)"),
            ({"logging": {"target": "syslog"}}, "logging"),
            ({"logging": {"target": "eventlog"}}, "logging.target"),
            ({"dnsServers": ["dns.example.com"]}, "dnsServers[0]"),
            ({"allowedNetworks": ["10.0.0.0/33"]}, "allowedNetworks[0]"),
            ({"gateway": {"host": "gw:99999"}}, "gateway.host"),
            ({"colour": "blue"}, "colour"),
        ],
    )
    def test_problems_name_the_field(self, document: dict[str, object], field: str) -> None:
        """Every problem is reported with the field it concerns."""
        with pytest.raises(ConfigError) as caught:
            parse_config(document)
        assert any(p.startswith(f"{field}:") for p in caught.value.problems), caught.value.problems


class TestCheckConfigCommand:
    def test_good_file_exits_zero(self, tmp_path: Path) -> None:
        """check-config accepts a valid file."""
        result = _check(tmp_path, "delivery:\n  queueTimer: 90s\n")
        assert result.returncode == 0, result.stderr

    def test_bad_file_prints_one_line_per_problem(self, tmp_path: Path) -> None:
        """check-config exits 1 with a line per problem, each naming its field."""
        result = _check(tmp_path, "delivery:\n  queueTimer: soon\n  tries: -1\nlisten: ':'\n")
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 3, lines
        assert any("delivery.queueTimer" in line for line in lines)
        assert any("delivery.tries" in line for line in lines)
        assert any("listen" in line for line in lines)

    def test_serve_refuses_a_bad_file_the_same_way(self, tmp_path: Path) -> None:
        """serve exits 1 with the same message instead of starting."""
        path = tmp_path / "relay.yaml"
        path.write_text("gateway:\n  sendAll: true\n")
        result = subprocess.run(
            [sys.executable, "-m", "smtprelay", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert "gateway: sendAll requires gateway.host" in result.stderr
