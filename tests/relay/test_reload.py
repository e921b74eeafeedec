"""Changes without a restart: a new relay.yaml or new gateway credentials reach the running
relay the way the kubelet delivers them (an atomic ``..data`` symlink swap)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.peers import Certificates, Relay, Sink, wait_for
from tests.podsim import AtomicVolume
from tests.relay.mail import Sender, send
from tests.reliability.wire import Wire

Start = Callable[..., Any]


def _start(
    start_relay: Start, tmp_path: Path, config: dict[str, Any]
) -> tuple[Relay, AtomicVolume]:
    """A relay reading relay.yaml from a kubelet-style volume (the same settings Relay
    would write, so ports and spool are its own)."""
    holder: dict[str, AtomicVolume] = {}

    def wrapper(argv: list[str]) -> list[str]:
        source = Path(argv[-1])
        holder["volume"] = AtomicVolume(tmp_path / "config", {"relay.yaml": source.read_text()})
        return [*argv[:-1], str(tmp_path / "config" / "relay.yaml")]

    relay: Relay = start_relay(config, wrapper=wrapper)
    return relay, holder["volume"]


def _update(relay: Relay, volume: AtomicVolume, **changes: Any) -> str:
    """Write relay.yaml with ``changes``; returns its hash (what the operator computes)."""
    relay.config = {**relay.config, **changes}
    text = yaml.safe_dump(relay.config)
    volume.write({"relay.yaml": text})
    return hashlib.sha256(text.encode()).hexdigest()


def _config(relay: Relay) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/config", timeout=5) as r:
        state: dict[str, Any] = json.loads(r.read())
        return state


class TestConfigReload:
    def test_gateway_change_applies_live_losing_nothing(
        self, start_sink: Start, start_relay: Start, smtp_port: int, tmp_path: Path
    ) -> None:
        """While a client sends every 100 ms, relay.yaml switches gateways: no refused
        connection, every message arrives (old gateway before, new one after), the same
        process logs config_reloaded with the new hash and reports it on /config."""
        old = start_sink("127.0.0.21", smtp_port)
        new = start_sink("127.0.0.22", smtp_port)
        relay, volume = _start(
            start_relay,
            tmp_path,
            {"gateway": {"host": f"{old.host}:{smtp_port}", "sendAll": True}},
        )
        pid = relay.process.pid if relay.process else None
        sender = Sender(relay.port)
        try:
            wait_for(lambda: len(sender.sent) >= 5, what="mail through the old gateway")
            digest = _update(
                relay, volume, gateway={"host": f"{new.host}:{smtp_port}", "sendAll": True}
            )
            wait_for(lambda: relay.events("config_reloaded"), what="config_reloaded")
            switched = len(sender.sent)
            wait_for(lambda: len(sender.sent) >= switched + 5, what="mail after the switch")
        finally:
            sender.stop()
        assert sender.errors == []
        [reloaded] = relay.events("config_reloaded")
        assert reloaded["hash"] == digest
        assert _config(relay)["hash"] == digest
        assert relay.process is not None
        assert relay.process.pid == pid
        wait_for(
            lambda: len(old.messages) + len(new.messages) == len(sender.sent),
            what="every message delivered",
        )
        assert new.messages, "the new gateway got the mail sent after the switch"
        late = {str(m.message["Subject"]) for m in new.messages}
        assert f"message {len(sender.sent)}" in late

    def test_invalid_file_is_refused_and_the_old_settings_stay(
        self, start_sink: Start, start_relay: Start, smtp_port: int, tmp_path: Path
    ) -> None:
        """An invalid relay.yaml: config_refused naming the field, /config keeps the old
        hash and shows the refusal, and mail still flows under the old settings."""
        gateway = start_sink("127.0.0.23", smtp_port)
        relay, volume = _start(
            start_relay,
            tmp_path,
            {"gateway": {"host": f"{gateway.host}:{smtp_port}", "sendAll": True}},
        )
        running = _config(relay)["hash"]
        bad = _update(relay, volume, delivery={"tries": 0})
        wait_for(lambda: relay.events("config_refused"), what="config_refused")
        [refused] = relay.events("config_refused")
        assert refused["hash"] == bad
        assert any(problem.startswith("delivery.tries") for problem in refused["problems"])
        state = _config(relay)
        assert state["hash"] == running
        assert state["refused"]["hash"] == bad
        send(relay.port, "app@sender.test", ["bob@example.test"])
        gateway.wait_for_messages(1)

    def test_a_change_that_needs_a_restart_is_refused(
        self, start_relay: Start, tmp_path: Path
    ) -> None:
        """A new listen address cannot be taken live: refused, naming the field."""
        relay, volume = _start(start_relay, tmp_path, {})
        _update(relay, volume, listen="127.0.0.1:1")
        wait_for(lambda: relay.events("config_refused"), what="config_refused")
        [refused] = relay.events("config_refused")
        assert refused["problems"] == ["listen: changes only with a restart"]


class TestLimitsReload:
    def test_new_session_limits_apply_to_the_next_connection(
        self, start_relay: Start, tmp_path: Path
    ) -> None:
        """limits.sessionsPerClient raised from 1 to 3 in relay.yaml: the running relay
        admits three sessions from one address, without a restart."""
        relay, volume = _start(start_relay, tmp_path, {"limits": {"sessionsPerClient": 1}})
        with Wire(relay.port) as first, Wire(relay.port) as second:
            assert first.greeting.startswith(b"220")
            assert second.greeting.startswith(b"421 4.7.0")
        _update(relay, volume, limits={"sessionsPerClient": 3})
        wait_for(lambda: relay.events("config_reloaded"), what="config_reloaded")
        wires = [Wire(relay.port) for _ in range(4)]
        try:
            greetings = [wire.greeting[:3] for wire in wires]
        finally:
            for wire in wires:
                wire.close()
        assert greetings == [b"220", b"220", b"220", b"421"]


def _spread(events: list[dict[str, Any]]) -> float:
    """Seconds between the first and the last of ``events``."""
    times = [datetime.datetime.fromisoformat(e["timestamp"]) for e in events]
    return (max(times) - min(times)).total_seconds()


class TestReloadTogether:
    """The workers of one relay switch to a new relay.yaml within moments of each other (a
    message must not be taken under the new settings by one worker and delivered under the
    old by the next), and SIGHUP makes the relay look at the file at once."""

    def _two_workers(self, start_relay: Start, tmp_path: Path) -> tuple[Relay, AtomicVolume]:
        relay, volume = _start(start_relay, tmp_path, {"workers": 2})
        wait_for(lambda: len(relay.events("started")) == 2, what="both workers started")
        return relay, volume

    def _switched_together(self, relay: Relay, new: str) -> None:
        reloads = wait_for(
            lambda: (
                (found := [e for e in relay.events("config_reloaded") if e["hash"] == new])
                and len(found) == 2
                and found
            ),
            timeout=10,
            what="config_reloaded from both workers",
        )
        assert len({e["pid"] for e in reloads}) == 2
        assert _spread(reloads) < 0.4, reloads
        assert relay.process is not None
        assert relay.process.poll() is None

    def test_a_worker_that_switches_has_the_other_switch_at_once(
        self, start_relay: Start, tmp_path: Path
    ) -> None:
        """SIGHUP to one worker right after the file changed: it switches, and through the
        supervisor so does the other, not at its own next poll up to a second later."""
        relay, volume = self._two_workers(start_relay, tmp_path)
        worker = next(e["pid"] for e in relay.events("started") if e["worker"] == 0)
        new = _update(relay, volume, delivery={"queueTimer": "7m"})
        os.kill(worker, signal.SIGHUP)
        self._switched_together(relay, new)

    def test_sighup_to_the_relay_reloads_every_worker_now(
        self, start_relay: Start, tmp_path: Path
    ) -> None:
        """An administrator's `kill -HUP` to the relay's process: every worker looks now."""
        relay, volume = self._two_workers(start_relay, tmp_path)
        new = _update(relay, volume, delivery={"queueTimer": "9m"})
        assert relay.process is not None
        os.kill(relay.process.pid, signal.SIGHUP)
        self._switched_together(relay, new)


class _Login:
    """An aiosmtpd authenticator accepting user "relay" with whatever password is current."""

    def __init__(self, password: str) -> None:
        self.password = password

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"relay",
            self.password.encode(),
        )
        return AuthResult(success=ok, auth_data=data)


class TestCredentialRotation:
    def test_rotated_gateway_password_is_used_without_restart(
        self, start_sink: Start, start_relay: Start, smtp_port: int, tmp_path: Path
    ) -> None:
        """The gateway's password changes and its Secret volume is updated: the next message
        authenticates with the new one; the process is the same."""
        certs = Certificates(tmp_path / "gw-tls", names=("127.0.0.24",))
        login = _Login("first-secret")
        gateway: Sink = start_sink(
            "127.0.0.24",
            smtp_port,
            tls_context=certs.server_context(),
            authenticator=login,
            auth_required=True,
            auth_require_tls=True,
        )
        secret = AtomicVolume(
            tmp_path / "secret", {"username": "relay", "password": "first-secret"}
        )
        relay: Relay = start_relay(
            {
                "gateway": {
                    "host": f"{gateway.host}:{smtp_port}",
                    "sendAll": True,
                    "credentialsFile": str(secret.path),
                    "caFile": str(certs.ca_file),
                },
                "delivery": {"queueTimer": "1s"},
            }
        )
        pid = relay.process.pid if relay.process else None
        send(relay.port, "app@sender.test", ["bob@example.test"], subject="before")
        gateway.wait_for_messages(1)
        login.password = "second-secret"  # noqa: S105 - the test gateway's password
        secret.write({"username": "relay", "password": "second-secret"})
        wait_for(lambda: relay.events("credentials_reloaded"), what="credentials_reloaded")
        send(relay.port, "app@sender.test", ["bob@example.test"], subject="after")
        got = gateway.wait_for_messages(2)
        assert [str(m.message["Subject"]) for m in got] == ["before", "after"]
        assert relay.process is not None
        assert relay.process.pid == pid
        assert "second-secret" not in relay.log_text()
