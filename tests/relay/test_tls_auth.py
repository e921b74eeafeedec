"""STARTTLS and SMTP AUTH at the front door, and AUTH over TLS to the gateway; trustme certificates."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import AuthResult, LoginPassword
from smtprelay.auth import FailureLimiter, hash_password, verify_password
from smtprelay.cli import main
from smtprelay.tlsreload import ReloadingContext

from tests.peers import Certificates, Relay, Sink, wait_for
from tests.relay.mail import message, send

Start = Callable[..., Any]
PASSWORD = "correct horse battery staple"  # noqa: S105 -- a test user


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path / "tls")


def _secure_relay(start_relay: Start, certs: Certificates, tmp_path: Path, **extra: Any) -> Relay:
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump({"alice": hash_password(PASSWORD)}))
    config = {
        "allowedNetworks": ["10.0.0.0/8"],  # loopback clients must authenticate to relay
        "tls": {"certFile": str(certs.cert_file), "keyFile": str(certs.key_file)},
        "auth": {"usersFile": str(users)},
        **extra,
    }
    relay: Relay = start_relay(config)
    return relay


def _auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN (smtplib's login() would go on to try LOGIN after a failure)."""
    client.user, client.password = user, password
    return client.auth("PLAIN", client.auth_plain)


def _client(relay: Relay) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
    client.ehlo("client.test")
    return client


class TestPasswordHash:
    def test_a_hash_verifies_its_password_only(self) -> None:
        """hash-password's format round-trips; another password or a mangled hash fails."""
        encoded = hash_password("s3cret")
        assert encoded.startswith("$scrypt$ln=14,r=8,p=1$")
        assert verify_password("s3cret", encoded)
        assert not verify_password("s3cret!", encoded)
        assert not verify_password("s3cret", encoded[:-4])
        assert not verify_password("s3cret", "plain-text")

    def test_cli_prints_a_users_file_line(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`smtprelay hash-password --user` reads stdin and prints a YAML line for usersFile."""
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("pw-from-stdin\n"))
        assert main(["hash-password", "--user", "app"]) == 0
        users = yaml.safe_load(capsys.readouterr().out)
        assert verify_password("pw-from-stdin", users["app"])

    def test_the_limiter_blocks_after_the_limit_and_forgets_after_the_window(self) -> None:
        """Five failures in the window block an address; they age out; others are unaffected."""
        now = [1000.0]
        limiter = FailureLimiter(limit=5, window=300, clock=lambda: now[0])
        assert [limiter.failed("10.0.0.1") for _ in range(5)] == [False] * 4 + [True]
        assert limiter.blocked("10.0.0.1")
        assert not limiter.blocked("10.0.0.2")
        now[0] += 301
        assert not limiter.blocked("10.0.0.1")


class TestReloadingContext:
    def test_a_broken_renewal_keeps_the_last_good_certificate(self, certs: Certificates) -> None:
        """A key that does not match its certificate is reported once; the old context stays."""
        now = [0.0]
        problems: list[str | None] = []
        context = ReloadingContext(
            certs.cert_file, certs.key_file, on_reload=problems.append, clock=lambda: now[0]
        )
        first = context.current()
        other = Certificates(certs.directory.parent / "other")
        certs.key_file.write_bytes(other.key_file.read_bytes())  # mismatched pair
        now[0] += 2
        assert context.current() is first
        now[0] += 2
        assert context.current() is first
        assert len(problems) == 1
        assert problems[0] is not None
        certs.issue()  # a good pair again
        now[0] += 2
        assert context.current() is not first
        assert problems[-1] is None
        assert context.reloads == 1


class TestStartTls:
    def test_starttls_is_offered_and_auth_only_under_it(
        self, start_relay: Start, certs: Certificates, tmp_path: Path
    ) -> None:
        """EHLO offers STARTTLS and no AUTH; after the handshake AUTH PLAIN LOGIN appears."""
        relay = _secure_relay(start_relay, certs, tmp_path)
        with _client(relay) as client:
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")
            assert client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 538
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            assert client.has_extn("auth")
            assert set(client.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
            assert client.sock is not None

    def test_a_renewed_certificate_is_served_to_the_next_connection(
        self, start_relay: Start, certs: Certificates, tmp_path: Path
    ) -> None:
        """Replacing tls.crt/tls.key (as cert-manager does) changes the certificate, no restart."""
        relay = _secure_relay(start_relay, certs, tmp_path)

        def served() -> bytes:
            with _client(relay) as client:
                client.starttls(context=certs.client_context())
                assert isinstance(client.sock, ssl.SSLSocket)
                der = client.sock.getpeercert(binary_form=True)
                assert der is not None
                return der

        first = served()
        renewed = certs.issue()
        assert renewed != first
        wait_for(lambda: served() == renewed, timeout=10, what="the renewed certificate")
        assert relay.events("tls_reloaded")

    def test_without_a_users_file_auth_is_not_offered(
        self, start_relay: Start, certs: Certificates
    ) -> None:
        """TLS alone: no AUTH in EHLO after STARTTLS, and AUTH is answered 502."""
        relay: Relay = start_relay(
            {"tls": {"certFile": str(certs.cert_file), "keyFile": str(certs.key_file)}}
        )
        with _client(relay) as client:
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            assert not client.has_extn("auth")
            assert client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 502


class TestAuth:
    def test_an_authenticated_client_may_relay_from_outside_allowed_networks(
        self, start_relay: Start, certs: Certificates, tmp_path: Path
    ) -> None:
        """Refused (554 5.7.1) before AUTH; after AUTH PLAIN the same recipient is accepted."""
        relay = _secure_relay(start_relay, certs, tmp_path)
        with _client(relay) as client:
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            client.mail("app@sender.test")
            assert client.rcpt("bob@example.test")[0] == 554
            client.rset()
            assert _auth_plain(client, "alice", PASSWORD)[0] == 235
            client.mail("app@sender.test")
            assert client.rcpt("bob@example.test")[0] == 250
            code, reply = client.data(message("app@sender.test", ["bob@example.test"]))
            assert code == 250, reply
        [queued] = relay.queued()
        assert b"with ESMTPSA" in (relay.spool / "queue" / queued).read_bytes()
        [auth] = relay.events("auth")
        assert (auth["user"], auth["outcome"], auth["client"]) == ("alice", "success", "127.0.0.1")

    def test_a_changed_users_file_takes_effect_without_restart(
        self, start_relay: Start, certs: Certificates, tmp_path: Path
    ) -> None:
        """The users Secret is re-read: a rotated password works, the old one no longer does."""
        relay = _secure_relay(start_relay, certs, tmp_path)
        (tmp_path / "users.yaml").write_text(yaml.safe_dump({"alice": hash_password("rotated")}))

        def code(password: str) -> int:
            with _client(relay) as client:
                client.starttls(context=certs.client_context())
                client.ehlo("client.test")
                try:
                    return _auth_plain(client, "alice", password)[0]
                except smtplib.SMTPAuthenticationError as error:
                    return error.smtp_code

        assert code("rotated") == 235
        assert code(PASSWORD) == 535

    def test_swaks_sends_with_starttls_and_auth_login(
        self, start_relay: Start, certs: Certificates, tmp_path: Path
    ) -> None:
        """swaks --tls --auth LOGIN, a real third-party client, gets its message queued."""
        relay = _secure_relay(start_relay, certs, tmp_path)
        result = subprocess.run(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{relay.port}",
                "--from",
                "app@sender.test",
                "--to",
                "bob@example.test",
                "--tls",
                "--tls-ca-path",
                str(certs.ca_file),
                "--auth",
                "LOGIN",
                "--auth-user",
                "alice",
                "--auth-password",
                PASSWORD,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 " in result.stdout
        assert len(relay.queued()) == 1

    def test_a_wrong_password_gets_535_and_repeated_failures_421(
        self, start_relay: Start, certs: Certificates, tmp_path: Path
    ) -> None:
        """535 5.7.8 per failure; the fifth in the window drops the client, who stays refused."""
        relay = _secure_relay(start_relay, certs, tmp_path)
        codes = []
        with _client(relay) as client:
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            for _ in range(5):
                with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                    _auth_plain(client, "alice", "wrong")
                codes.append(refused.value.smtp_code)
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.noop()  # the relay hung up after the fifth
        assert codes == [535, 535, 535, 535, 421]
        with _client(relay) as client:
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                _auth_plain(client, "alice", PASSWORD)  # even the right password, for now
            assert refused.value.smtp_code == 421
        outcomes = [e["outcome"] for e in relay.events("auth")]
        assert outcomes == ["failure"] * 5

    def test_debug_transcript_masks_auth_secrets(
        self, start_relay: Start, certs: Certificates, tmp_path: Path
    ) -> None:
        """With logging.debug the session is transcribed both ways, the password never."""
        relay = _secure_relay(
            start_relay, certs, tmp_path, logging={"target": "stdout", "debug": True}
        )
        with _client(relay) as client:
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            _auth_plain(client, "alice", PASSWORD)  # AUTH PLAIN <initial response>
        lines = [(e["direction"], e["line"]) for e in relay.events("smtp")]
        assert ("in", "STARTTLS") in lines
        assert ("in", "AUTH PLAIN ********") in lines
        assert any(d == "out" and line.startswith("235 ") for d, line in lines)
        assert "YWxpY2U" not in relay.log_text()  # base64 of the user name: never logged
        assert PASSWORD not in relay.log_text()


class _GatewayLogin:
    """An aiosmtpd authenticator accepting one user."""

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"relay",
            b"gw-secret",
        )
        return AuthResult(success=ok, auth_data=data)


class TestGatewayAuth:
    def _relay(
        self,
        start_relay: Start,
        tmp_path: Path,
        gateway: Sink,
        debug: bool = False,
        **options: Any,
    ) -> Relay:
        credentials = tmp_path / "gateway"
        credentials.mkdir()
        (credentials / "username").write_text("relay\n")
        (credentials / "password").write_text("gw-secret\n")
        relay: Relay = start_relay(
            {
                "gateway": {
                    "host": f"{gateway.host}:{gateway.port}",
                    "sendAll": True,
                    "credentialsFile": str(credentials),
                    **options,
                },
                "delivery": {"queueTimer": "1h"},
                "logging": {"target": "stdout", "debug": debug},
            }
        )
        return relay

    @pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
    def test_the_relay_authenticates_to_the_gateway_over_starttls(
        self,
        start_sink: Start,
        start_relay: Start,
        smtp_port: int,
        tmp_path: Path,
        pipelining: bool,
    ) -> None:
        """With credentialsFile the relay does STARTTLS, then AUTH, then sends (pipelined
        inside TLS where offered); no secret logged."""
        certs = Certificates(tmp_path / "gw-tls", names=("127.0.0.9",))
        gateway: Sink = start_sink(
            "127.0.0.9",
            smtp_port,
            pipelining=pipelining,
            tls_context=certs.server_context(),
            authenticator=_GatewayLogin(),
            auth_required=True,
            auth_require_tls=True,
        )
        relay = self._relay(start_relay, tmp_path, gateway, debug=True, caFile=str(certs.ca_file))
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [got] = gateway.wait_for_messages()
        assert got.login == "relay"
        assert got.recipients == ("bob@example.test",)
        assert (b"RCPT TO:" in gateway.after_mail[0]) == pipelining
        sent = [e["line"] for e in relay.events("smtp") if e["direction"] == "send"]
        assert sent.index("STARTTLS") < next(i for i, s in enumerate(sent) if s.startswith("AUTH"))
        assert "gw-secret" not in relay.log_text()
        wait_for(lambda: relay.queued() == [], what="the spool to empty")

    def test_a_gateway_without_starttls_never_gets_the_password(
        self, start_sink: Start, start_relay: Start, smtp_port: int, tmp_path: Path
    ) -> None:
        """No STARTTLS offered: the attempt defers rather than send credentials in clear."""
        gateway: Sink = start_sink(
            "127.0.0.9",
            smtp_port,
            authenticator=_GatewayLogin(),
            auth_require_tls=False,
        )
        relay = self._relay(start_relay, tmp_path, gateway)
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        [attempt] = wait_for(lambda: relay.events("delivery"), what="the first attempt")
        assert attempt["outcome"] == "deferred"
        assert gateway.messages == []
        assert len(relay.queued()) == 1
