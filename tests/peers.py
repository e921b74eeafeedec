"""Real peers for the relay's tests: dnsmasq, aiosmtpd sinks, and the relay as a process.

Every peer here is the real program on a loopback address; the tests start and stop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.nameserver
import dns.resolver
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_and_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (a DNS server listens on both)."""
    while True:
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def postfix_tool(name: str) -> str:
    """A Postfix test program (smtp-sink, smtp-source)."""
    found = shutil.which(name) or f"/usr/sbin/{name}"
    assert os.path.exists(found), f"{name} is installed by scripts/setup.sh (apt-get postfix)"
    return found


# --- DNS -----------------------------------------------------------------------------------


@dataclass
class Zone:
    """Records dnsmasq serves; every other name under .test is NXDOMAIN."""

    mx: list[tuple[str, str, int]] = field(default_factory=list)  # (domain, exchange, pref)
    a: list[tuple[str, str]] = field(default_factory=list)  # (name, ip)
    null_mx: list[str] = field(default_factory=list)

    def arguments(self) -> list[str]:
        args = [f"--mx-host={d},{x},{p}" for d, x, p in self.mx]
        args += [f"--host-record={name},{ip}" for name, ip in self.a]
        args += [f"--dns-rr={name},15,000000" for name in self.null_mx]  # MX 0 "." (RFC 7505)
        return args


class Dnsmasq:
    """dnsmasq on 127.0.0.1:<free port> (or another local `address`), authoritative for .test.

    A port free for TCP may still be held for UDP (a resolver's ephemeral query socket, the
    relay's own among them), and dnsmasq then exits with "Address already in use". The port
    is chosen free for both, and a dnsmasq that exits while starting is started again on
    another port, so a busy port never costs a test.
    """

    def __init__(self, zone: Zone, log_dir: Path, *, address: str = "127.0.0.1") -> None:
        self._log = (log_dir / "dnsmasq.log").open("w")
        for _attempt in range(5):
            self.port = free_udp_and_tcp_port(address)
            self.server = f"{address}:{self.port}"
            self.process = self._start(zone, address)
            if self._answers_or_exits(address):
                return
            self._log.write(f"--- dnsmasq exited with {self.process.returncode}; new port\n")
            self._log.flush()
        raise AssertionError(f"dnsmasq would not start; see {log_dir / 'dnsmasq.log'}")

    def _start(self, zone: Zone, address: str) -> subprocess.Popen[bytes]:
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        return subprocess.Popen(
            [
                binary,
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                f"--listen-address={address}",
                f"--port={self.port}",
                "--local=/test/",
                "--pid-file=",
                "--log-facility=-",
                f"--user={os.environ.get('USER') or 'root'}",
                *zone.arguments(),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _answers_or_exits(self, address: str) -> bool:
        """True once dnsmasq answers; False when it exited before it did."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(address, self.port)]
        resolver.lifetime = 0.5

        def settled() -> str:
            if self.process.poll() is not None:
                return "exited"
            try:
                resolver.resolve("probe.test", "A")
            except dns.resolver.NXDOMAIN:
                return "answers"
            except Exception:
                return ""
            return "answers"

        return bool(wait_for(settled, timeout=10, what="dnsmasq to answer") == "answers")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


# --- SMTP sinks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    peer: str
    login: str = ""  # the AUTH user, when the sink requires AUTH
    source: str = ""  # the client's address and port: one per connection

    @property
    def message(self) -> email.message.EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        earlier = getattr(session, "sink_mails", 0)
        session.sink_mails = earlier + 1  # type: ignore[attr-defined]
        limit = self._sink.mails_per_session
        if limit is not None and earlier >= limit:
            if server.transport is not None:  # as a server whose idle timer ran out meanwhile
                server.transport.close()
            return "421 4.4.2 sink: session timed out"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        # What the client had sent already behind its MAIL (read, not yet handled): its RCPT
        # lines when it pipelines.
        self._sink.after_mail.append(bytes(server._reader._buffer))  # type: ignore[attr-defined]
        return "250 2.1.0 OK"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self._sink.pipelining:  # aiosmtpd reads pipelined commands one by one anyway
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._sink.rcpt_delay:  # each RCPT reply its own packet, after the MAIL reply
            await asyncio.sleep(self._sink.rcpt_delay)
        reply = self._sink.rcpt_reply(address)
        if reply.startswith("250") or self._sink.data_despite_refusals:
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._sink.in_data.set()
        with self._sink.lock:
            self._sink.active += 1
            self._sink.most_active = max(self._sink.most_active, self._sink.active)
        try:
            while self._sink.hold is not None and not self._sink.hold.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # a slow destination, released by the test
            await asyncio.sleep(self._sink.data_delay)  # a destination that is slow to answer
        finally:
            with self._sink.lock:
                self._sink.active -= 1
        if self._sink.data_reply.startswith("250"):
            with self._sink.lock:
                self._sink.messages.append(
                    Received(
                        sender="" if envelope.mail_from == "<>" else str(envelope.mail_from),
                        recipients=tuple(envelope.rcpt_tos),
                        data=envelope.original_content or b"",
                        peer=str(session.peer[0]) if session.peer else "",
                        login=getattr(session.auth_data, "login", b"").decode(),
                        source=f"{session.peer[0]}:{session.peer[1]}" if session.peer else "",
                    )
                )
        return self._sink.data_reply


class Sink:
    """An aiosmtpd server that keeps what it receives, or answers with the codes it is given."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        rcpt_reply: str | Callable[[str], str] = "250 2.1.5 OK",
        data_reply: str = "250 2.0.0 OK",
        hold: threading.Event | None = None,
        data_delay: float = 0.0,
        mails_per_session: int | None = None,
        pipelining: bool = False,
        rcpt_delay: float = 0.0,
        data_despite_refusals: bool = False,
        **smtp_options: Any,
    ) -> None:
        """``hold``: DATA is answered only once it is set; ``mails_per_session``: a MAIL
        beyond that many on one connection is answered 421 and the connection closed;
        ``pipelining``: EHLO offers PIPELINING; ``rcpt_delay``: each RCPT is answered late;
        ``data_despite_refusals``: DATA is answered 354 even when every RCPT was refused (a
        broken hop);
        ``smtp_options`` go to aiosmtpd's SMTP (``tls_context``, ``authenticator``,
        ``auth_required`` ...)."""
        self.host = host
        self.port = port
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self._rcpt = rcpt_reply
        self.data_reply = data_reply
        self.hold = hold
        self.in_data = threading.Event()
        self.data_delay = data_delay
        self.mails_per_session = mails_per_session
        self.pipelining = pipelining
        self.after_mail: list[bytes] = []
        self.data_despite_refusals = data_despite_refusals
        self.rcpt_delay = rcpt_delay
        self.active = 0  # sessions in DATA now, and the most there ever were at once
        self.most_active = 0
        self._controller = Controller(
            _SinkHandler(self), hostname=host, port=port, ready_timeout=10, **smtp_options
        )
        self._controller.start()

    def rcpt_reply(self, address: str) -> str:
        return self._rcpt(address) if callable(self._rcpt) else self._rcpt

    def wait_for_messages(self, count: int = 1, timeout: float = 20.0) -> list[Received]:
        def enough() -> list[Received] | None:
            with self.lock:
                return list(self.messages) if len(self.messages) >= count else None

        result: list[Received] = wait_for(
            enough, timeout=timeout, what=f"{count} message(s) at {self.host}:{self.port}"
        )
        return result

    def stop(self) -> None:
        if self._controller._thread is not None:  # a test may have stopped it already
            self._controller.stop()


# --- the relay under test ------------------------------------------------------------------


class Relay:
    """``smtprelay serve`` as a real process, with its own spool and config file."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        wrapper: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self._wrapper = wrapper or (lambda argv: argv)
        self.port = free_port()
        self.metrics_port = free_port()
        self.spool = workdir / "spool"
        self.config = {
            "listen": f"127.0.0.1:{self.port}",
            "metricsListen": f"127.0.0.1:{self.metrics_port}",
            "spoolDir": str(self.spool),
            "hostname": "relay.test",
            "logging": {"target": "stdout"},
            "workers": 1,  # one process, unless a test asks for more
            # The default leaves loopback out (sidecars); here the clients are on loopback.
            "allowedNetworks": ["127.0.0.0/8"],
            # No DNS unless a test brings dnsmasq: a closed port makes every lookup a
            # temporary failure, so accepted mail stays queued instead of depending on
            # whatever the machine's resolver says about .test names.
            "dnsServers": ["127.0.0.1:9"],
            **config,
        }
        self.config_path = workdir / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "relay.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self._wrapper(
                [sys.executable, "-m", "smtprelay", "serve", "--config", str(self.config_path)]
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.ready, timeout=20, what="the relay's /readyz")

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"relay exited {self.process.returncode}:\n{self.log_text()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines the relay wrote, optionally only those of one event."""
        found = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    found.append(event)
        return found

    def queued(self) -> list[str]:
        queue = self.spool / "queue"
        if not queue.exists():
            return []
        return sorted(p.name for p in queue.glob("*.eml") if not p.name.startswith("."))

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a node failure."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM, as Kubernetes does; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(40)
        self._log.close()
        return int(self.process.returncode)


@contextlib.contextmanager
def running(*peers: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for peer in peers:
            peer.stop()


# --- log servers and certificates ----------------------------------------------------------


class SyslogReceiver:
    """A log server on 127.0.0.1: UDP datagrams, or TCP with RFC 6587 octet counting."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.lines: list[str] = []
        self._lock = threading.Lock()
        kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
        self._sock = socket.socket(socket.AF_INET, kind)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.server = f"127.0.0.1:{self.port}"
        self._sock.settimeout(0.2)
        if kind == socket.SOCK_STREAM:
            self._sock.listen()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _keep(self, line: bytes) -> None:
        with self._lock:
            self.lines.append(line.decode())

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                if self.protocol == "udp":
                    self._keep(self._sock.recv(65535))
                else:
                    connection, _ = self._sock.accept()
                    threading.Thread(target=self._read_tcp, args=(connection,), daemon=True).start()
            except TimeoutError:
                continue
            except OSError:
                return

    def _read_tcp(self, connection: socket.socket) -> None:
        buffer = b""
        with connection:
            connection.settimeout(0.2)
            while not self._stopped.is_set():
                try:
                    chunk = connection.recv(65535)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self._keep(rest[: int(length)])
                    buffer = rest[int(length) :]

    def received(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def stop(self) -> None:
        self._stopped.set()
        self._sock.close()
        self._thread.join(5)


@dataclass
class Certificates:
    """A test CA (``trustme``) and a server certificate for ``names``, as PEM files."""

    directory: Path
    names: tuple[str, ...] = ("relay.test", "127.0.0.1")

    def __post_init__(self) -> None:
        import trustme

        self.ca = trustme.CA()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file = self.directory / "tls.crt"
        self.key_file = self.directory / "tls.key"
        self.issue()

    def issue(self) -> bytes:
        """Write a new server certificate (as cert-manager renews one); returns its DER."""
        leaf = self.ca.issue_cert(*self.names)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        tmp_cert = self.directory / "tls.crt.new"
        tmp_key = self.directory / "tls.key.new"
        tmp_cert.write_bytes(chain)
        tmp_key.write_bytes(leaf.private_key_pem.bytes())
        os.replace(tmp_key, self.key_file)
        os.replace(tmp_cert, self.cert_file)
        return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context
