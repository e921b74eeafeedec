"""The SMTP front door: protocol, relay policy, and 250 only once the message is on disk.

aiosmtpd speaks the protocol; this module's handler decides who may relay (``allowedNetworks``
or an authenticated session), rewrites bare user ids to the default mail host, refuses mail
loops, stamps a ``Received:`` header and hands the message to the spool. It knows nothing of
delivery: the spool is the interface.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from smtprelay.auth import FailureLimiter, Users
from smtprelay.config import MailSettings
from smtprelay.esmtp import (
    EsmtpParameters,
    ascii_form,
    message_options,
    recipient_options,
    utf8_problem,
)
from smtprelay.logs import debug_enabled, mail_log
from smtprelay.metrics import METRICS
from smtprelay.spool import Spool
from smtprelay.transcript import mask_auth, record

MAX_HOPS = 50
PROXY_TIMEOUT = 10.0  # seconds a trusted load balancer has to send its PROXY header
MAX_RECIPIENTS = 1000

SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
AUTH_BLOCKED = "421 4.7.0 Too many failed authentications from your address, try again later"
AUTH_NOT_OFFERED = "502 5.5.1 AUTH is not offered by this relay"

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"({_LABEL}(\.{_LABEL})*|\[(IPv6:)?[0-9A-Fa-f:.]+\])"
_LOCAL = r"[^@\s<>()\[\],;:\"\\]{1,64}|\"[^\"\\\r\n]{1,62}\""
ADDRESS = re.compile(rf"^({_LOCAL})@{_DOMAIN}$")
BARE_USER = re.compile(rf"^({_LOCAL})$")

# aiosmtpd's stock replies, given the enhanced status codes (RFC 3463) clients log.
_ENHANCED = {
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds the maximum allowed",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds the maximum allowed"
    ),
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
}


def parse_networks(cidrs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def client_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = peer[0] if isinstance(peer, tuple) else peer
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def count_hops(data: bytes) -> int:
    """How many Received: headers the message already carries."""
    head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]
    return len(re.findall(rb"(?im)^received:", head))


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str,
    now: float,
) -> bytes:
    """The trace header RFC 5321 §4.4 asks every relay to add."""
    single = f"\r\n\tfor <{recipient}>" if recipient else ""
    return (
        f"Received: from {helo or 'unknown'} ([{peer_ip}])\r\n"
        f"\tby {hostname} (smtprelay) with {protocol} id {queue_id}{single};\r\n"
        f"\t{email.utils.formatdate(now)}\r\n"
    ).encode("utf-8", "replace")


_PROTOCOL_NAMES: dict[type, list[str]] = {}


def _protocol_names(cls: type) -> list[str]:
    """The attributes aiosmtpd's ``SMTP.__init__`` builds its command and AUTH tables from."""
    names = _PROTOCOL_NAMES.get(cls)
    if names is None:
        names = [name for name in dir(cls) if name.startswith(("smtp_", "auth_"))]
        _PROTOCOL_NAMES[cls] = names
    return names


@dataclass(frozen=True)
class _Unchecked:
    """Credentials aiosmtpd has parsed, waiting for the (slow, threaded) password check."""

    mechanism: str
    credentials: LoginPassword


class RelaySMTP(EsmtpParameters, SMTP):
    """aiosmtpd's protocol, with what a production front door adds to it.

    RFC 3463 status codes on its stock size and line replies; DSN, SMTPUTF8 and BODY
    parameters kept (see :mod:`smtprelay.esmtp`); PROXY from trusted balancers; AUTH PLAIN/LOGIN against the
    users file, checked off the event loop and rate limited per client address; a graceful
    stop (``shut_down``); and, with ``logging.debug``, a transcript of the session.
    """

    def __init__(
        self,
        handler: Any,
        *,
        users: Users | None = None,
        limiter: FailureLimiter | None = None,
        proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._proxies = proxies or []
        self._users = users
        self._limiter = limiter or FailureLimiter()
        self._closing = False
        if debug_enabled():
            self._smtp_methods = {
                name: self._transcribed(name, method) for name, method in self._smtp_methods.items()
            }

    def __dir__(self) -> list[str]:
        # aiosmtpd's SMTP.__init__ runs inspect.getmembers(self) and dir(self) for every new
        # connection, evaluating each attribute (properties included) to find a handful of
        # methods: about a tenth of a session's CPU. Those names are fixed per class.
        return _protocol_names(type(self))

    # --- PROXY protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A trusted load balancer must start with a PROXY header (aiosmtpd reads it, then
        # calls handle_PROXY); anyone else gets plain SMTP, where PROXY is an unknown command.
        address = client_ip(transport.get_extra_info("peername"))
        trusted = address is not None and any(address in net for net in self._proxies)
        self._proxy_timeout = PROXY_TIMEOUT if trusted else None
        super().connection_made(transport)

    # --- transcript -------------------------------------------------------------------

    @property
    def peer_text(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def _transcribed(self, name: str, method: Callable[[str | None], Awaitable[None]]) -> Any:
        async def call(arg: str | None) -> None:
            record("in", self.peer_text, mask_auth(f"{name} {arg}" if arg else name))
            await method(arg)

        return call

    async def push(self, status: str) -> None:  # type: ignore[override]
        status = _ENHANCED.get(status, status)
        if status == "250-8BITMIME":  # aiosmtpd has no DSN; offer it beside 8BITMIME
            await self.push("250-DSN")
        if self._users is None and status.startswith("250-AUTH"):
            return  # aiosmtpd advertises AUTH under TLS; without a users file there is none
        if debug_enabled():
            record("out", self.peer_text, status)
        await super().push(status)

    # --- graceful stop ----------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def _hang_up(self, reply: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(reply.encode() + b"\r\n")
            self.transport.close()  # flushes the reply first

    def shut_down(self) -> None:
        """Take no more mail: an idle session is told 421 and closed now; one in the middle
        of a transaction finishes it (and gets its 250) and is closed after it."""
        self._closing = True
        if not self.in_transaction:
            self._hang_up(SHUTTING_DOWN)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._closing:
            self._hang_up(SHUTTING_DOWN)
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str | None) -> None:
        await super().smtp_DATA(arg)
        if self._closing:
            self._hang_up(SHUTTING_DOWN)

    # --- AUTH -------------------------------------------------------------------------

    @property
    def _client(self) -> str:
        return str(client_ip(self.session.peer if self.session else None))

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self._users is None:
            await self.push(AUTH_NOT_OFFERED)
            return
        if self._limiter.blocked(self._client):
            METRICS.auth.labels(outcome="blocked").inc()
            self._hang_up(AUTH_BLOCKED)
            return
        await super().smtp_AUTH(arg)

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # aiosmtpd checks credentials synchronously; scrypt is too slow for the event loop,
        # so the parsed credentials are handed to _settle, which checks them in a thread.
        return AuthResult(success=False, handled=False, auth_data=_Unchecked(mechanism, auth_data))

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._settle(await super().auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._settle(await super().auth_LOGIN(server, args))

    async def _settle(self, result: AuthResult) -> AuthResult:
        pending = result.auth_data
        if not isinstance(pending, _Unchecked) or self._users is None:
            return result  # malformed or aborted: aiosmtpd has answered already
        user = pending.credentials.login.decode("utf-8", "replace")
        ok = await self._users.check(user, pending.credentials.password)
        client = self._client
        mail_log().info(
            "auth",
            client=client,
            user=user,
            mechanism=pending.mechanism,
            outcome="success" if ok else "failure",
        )
        METRICS.auth.labels(outcome="success" if ok else "failure").inc()
        if ok:
            self._limiter.succeeded(client)
            return AuthResult(success=True, auth_data=pending.credentials)
        if self._limiter.failed(client):
            self._hang_up(AUTH_BLOCKED)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)  # 535 5.7.8


class RelayHandler:
    """aiosmtpd hooks implementing the relay's policy."""

    def __init__(
        self,
        *,
        settings: MailSettings,
        hostname: str,
        spool: Spool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._hostname = hostname
        self._spool = spool
        self._clock = clock
        self._networks = parse_networks(settings.allowed_networks)

    async def handle_PROXY(
        self, server: SMTP, session: Session, envelope: Envelope, proxy: ProxyData
    ) -> bool:
        """The load balancer names the real client: from now on the session's peer is it,
        so allowedNetworks, the logs and Received: see the client, not the balancer."""
        if proxy.src_addr is not None and client_ip((str(proxy.src_addr), 0)) is not None:
            balancer = str(client_ip(session.peer))
            # aiosmtpd annotates peer as a str; it holds the socket's peername tuple.
            session.peer = (str(proxy.src_addr), proxy.src_port or 0)  # type: ignore[assignment]
            mail_log().info(
                "proxied",
                client=str(client_ip(session.peer)),
                balancer=balancer,
                version=proxy.version,
            )
        return True  # LOCAL / UNKNOWN (health checks): the balancer's own address stays

    def may_relay(self, session: Session) -> bool:
        if session.authenticated:
            return True
        address = client_ip(session.peer)
        return address is not None and any(address in net for net in self._networks)

    def _refuse(self, session: Session, reason: str, reply: str, **fields: Any) -> str:
        METRICS.refused.labels(reason=reason).inc()
        mail_log().info(
            "refused", client=str(client_ip(session.peer)), reason=reason, reply=reply, **fields
        )
        return reply

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if address == "<>":
            address = ""  # the null reverse-path of reports (RFC 5321 §4.5.5)
        if problem := utf8_problem(address, bool(envelope.smtp_utf8)):
            return self._refuse(
                session, "bad_sender", f"553 5.6.7 Sender address {problem}", sender=address
            )
        if address and not ADDRESS.match(ascii_form(address)):
            return self._refuse(
                session,
                "bad_sender",
                f"553 5.1.7 Bad sender address syntax: <{address}>",
                sender=address,
            )
        envelope.mail_from = address or "<>"  # aiosmtpd needs a truthy value after MAIL
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self.may_relay(session):
            return self._refuse(
                session,
                "relay_denied",
                "554 5.7.1 Relaying denied: your address is not in allowedNetworks; "
                "authenticate first",
                sender=envelope.mail_from,
                recipient=address,
            )
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        if problem := utf8_problem(address, bool(envelope.smtp_utf8)):
            return self._refuse(
                session,
                "bad_recipient",
                f"553 5.6.7 Recipient address {problem}",
                sender=envelope.mail_from,
                recipient=address,
            )
        if BARE_USER.match(address):
            if self._settings.default_mail_host is None:
                return self._refuse(
                    session,
                    "bare_user",
                    f"550 5.1.3 <{address}> has no domain and no defaultMailHost is set",
                    sender=envelope.mail_from,
                    recipient=address,
                )
            address = f"{address}@{self._settings.default_mail_host}"
        elif not ADDRESS.match(ascii_form(address)):
            return self._refuse(
                session,
                "bad_recipient",
                f"553 5.1.3 Bad recipient address syntax: <{address}>",
                sender=envelope.mail_from,
                recipient=address,
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        peer = str(client_ip(session.peer))
        recipients = tuple(envelope.rcpt_tos)
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        hops = count_hops(data)
        if hops > MAX_HOPS:
            return self._refuse(
                session,
                "loop",
                f"554 5.4.6 Too many hops ({hops}): mail loop suspected",
                sender=sender,
                recipients=list(recipients),
            )
        now = self._clock()
        queue_id = self._spool.shard.new_id(now)
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        trace = received_header(
            helo=session.host_name or "",
            peer_ip=peer,
            hostname=self._hostname,
            protocol=protocol,
            queue_id=queue_id,
            recipient=recipients[0] if len(recipients) == 1 else "",
            now=now,
        )
        try:
            stored = await self._spool.enqueue(
                sender=sender,
                recipients=recipients,
                data=trace + data,
                client=peer,
                queue_id=queue_id,
                options=message_options(envelope),
                recipient_options=recipient_options(envelope),
            )
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return self._refuse(
                    session,
                    "spool_full",
                    "452 4.3.1 Insufficient system storage, try later",
                    sender=sender,
                    recipients=list(recipients),
                )
            return self._refuse(
                session,
                "spool_error",
                f"451 4.3.0 Local error in processing: {error.strerror}",
                sender=sender,
                recipients=list(recipients),
            )
        METRICS.accepted.inc()
        mail_log().info(
            "accepted",
            queue_id=stored.id,
            client=peer,
            helo=session.host_name,
            sender=sender,
            recipients=list(recipients),
            size=len(data),
        )
        return f"250 2.0.0 Ok: queued as {stored.id}"
