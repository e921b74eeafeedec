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
import functools
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from smtprelay.addresses import address_problem, canonical, helo_problem, local_part_problem
from smtprelay.auth import FailureLimiter, Users
from smtprelay.bodystream import BodyDecoder
from smtprelay.config import MailSettings
from smtprelay.dataphase import StreamingData
from smtprelay.esmtp import (
    EsmtpParameters,
    message_options,
    recipient_options,
    utf8_problem,
)
from smtprelay.linger import LingeringClose
from smtprelay.logs import debug_enabled, mail_log, system_log
from smtprelay.metrics import METRICS
from smtprelay.spool import Draft, Spool
from smtprelay.transcript import mask_auth, record

MAX_HOPS = 50
PROXY_TIMEOUT = 10.0  # seconds a trusted load balancer has to send its PROXY header
AFTER_REPLY_WAIT = 0.02  # seconds a 250's follow-up waits at most for the next reply
MAX_RECIPIENTS = 1000

SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
AUTH_BLOCKED = "421 4.7.0 Too many failed authentications from your address, try again later"
AUTH_NOT_OFFERED = "502 5.5.1 AUTH is not offered by this relay"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors in this session, closing connection"


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# aiosmtpd hangs up with a 502 after 5 unrecognised commands; limits.errorsPerSession (which
# counts those too) decides instead, and the hang-up is a 421 as RFC 5321 §3.8 asks.
aiosmtpd.smtp.BOGUS_LIMIT = 1_000_000

# aiosmtpd's stock replies, given the enhanced status codes (RFC 3463) clients log.
_ENHANCED = {
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds the maximum allowed",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds the maximum allowed"
    ),
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
}


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: list[str]) -> list[Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def client_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = peer[0] if isinstance(peer, tuple) else peer
    return _parse_ip(str(host))


@functools.lru_cache(maxsize=4096)
def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address, parsed once per address (several times a session otherwise)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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


def _run(works: list[Callable[[], None]]) -> None:
    for work in works:
        try:
            work()
        except Exception:  # one failing step must not skip the others or end the session
            system_log().exception("after_reply_failed")


_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attributes of ``cls`` that aiosmtpd's ``SMTP.__init__`` looks for, by prefix:
    computed once per class, as they are fixed per class."""
    names = _NAMES.get((cls, prefixes))
    if names is None:
        names = _NAMES[(cls, prefixes)] = [n for n in dir(cls) if n.startswith(prefixes)]
    return names


@dataclass(frozen=True)
class _Unchecked:
    """Credentials aiosmtpd has parsed, waiting for the (slow, threaded) password check."""

    mechanism: str
    credentials: LoginPassword


class RelaySMTP(LingeringClose, StreamingData, EsmtpParameters, SMTP):
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
        errors_limit: int = 20,
        data_timeout: float = 600.0,
        proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._proxies = proxies or []
        self._users = users
        self._limiter = limiter or FailureLimiter()
        self._closing = False
        self._errors = 0
        self._errors_limit = errors_limit
        self._data_timeout = data_timeout
        self._continued: list[str] = []  # lines of a multi-line reply, sent with its last
        self._after_next: list[Callable[[], None]] = []  # see `_replied`
        self._after_timer: asyncio.TimerHandle | None = None
        if debug_enabled():
            self._smtp_methods = {
                name: self._transcribed(name, method) for name, method in self._smtp_methods.items()
            }

    def __dir__(self) -> list[str]:
        # aiosmtpd's SMTP.__init__ runs inspect.getmembers(self) and dir(self) for every new
        # connection, evaluating each attribute (properties included) to find a handful of
        # methods: about a tenth of a session's CPU. Those names are fixed per class.
        return _names(type(self), ("smtp_", "auth_"))

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
        if self._lingering:
            return  # hung up: the last reply is out, nothing more is said
        status = _ENHANCED.get(status, status)
        # AUTH challenges come as bytes, base64 already; replies echo what the client sent
        if isinstance(status, str) and not (status.isascii() and status.isprintable()):
            status = _UNPRINTABLE.sub("?", status)
        if status == "250-8BITMIME":  # aiosmtpd has no DSN; offer it beside 8BITMIME
            await self.push("250-DSN")
        if self._users is None and status.startswith("250-AUTH"):
            return  # aiosmtpd advertises AUTH under TLS; without a users file there is none
        if isinstance(status, str) and status[3:4] == "-":
            self._continued.append(status)  # a multi-line reply (EHLO) goes out in one send
            return
        if self._continued:
            status = "\r\n".join([*self._continued, status])
            self._continued.clear()
        if debug_enabled():
            record("out", self.peer_text, status)
        await super().push(status)
        self._replied()
        if status[:1] in ("4", "5") and not status.startswith("421"):
            self._errors += 1
            if self._errors >= self._errors_limit:
                METRICS.refused.labels(reason="error_limit").inc()
                mail_log().info("disconnected", client=self._client, reason="error_limit")
                self._hang_up(TOO_MANY_ERRORS)

    # --- work that waits for the client's next command ---------------------------------

    def _replied(self) -> None:
        """A reply is written. What waited for the reply after a 250 (the handler's
        ``after_reply``: letting go of the spooled file, which starts its delivery, and the
        ``accepted`` log line) runs now, while the client reads this reply and sends its
        next command; what the reply just written leaves behind waits for the next one.

        Run at once after the 250, that work landed in the one gap a client never fills:
        it answers a 250 with its next command (QUIT, mostly) within microseconds, and
        waited ~0.1 ms for it. After the next reply (the 221) it overlaps with the
        client's hang-up instead. A client that sends nothing more for ``AFTER_REPLY_WAIT``
        seconds, or hangs up, does not hold it back (`_run_after`)."""
        due, self._after_next = self._after_next, self._taken()
        if self._after_next and self._after_timer is None:
            self._after_timer = self.loop.call_later(AFTER_REPLY_WAIT, self._run_after)
        elif not self._after_next and self._after_timer is not None:
            self._after_timer.cancel()
            self._after_timer = None
        _run(due)

    def _taken(self) -> list[Callable[[], None]]:
        """What the handler left for after its reply (`RelayHandler.end_message`)."""
        pending: list[Callable[[], None]] | None = getattr(self.session, "after_reply", None)
        if not pending:
            return []
        taken = list(pending)
        pending.clear()
        return taken

    def _run_after(self) -> None:
        """Everything still waiting, now: no next reply came in time, or none will (the
        client hung up, or the 250 itself could not be written)."""
        if self._after_timer is not None:
            self._after_timer.cancel()
            self._after_timer = None
        due, self._after_next = [*self._after_next, *self._taken()], []
        _run(due)

    def connection_lost(self, error: Exception | None) -> None:
        self._run_after()
        super().connection_lost(error)

    # --- graceful stop ----------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def _hang_up(self, reply: str) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self._lingering:
            self._writer.write(reply.encode() + b"\r\n")
            self.linger()  # not close(): unread input would turn the FIN into an RST

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        await self.push("221 2.0.0 Bye")
        self.linger()  # aiosmtpd closes at once, resetting a client that pipelined past QUIT

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

    # --- what the client names itself ------------------------------------------------

    async def _greeting_name_ok(self, verb: str, name: str | None) -> bool:
        """EHLO/HELO names go into the Received: header: refuse any that could forge one."""
        problem = helo_problem(name) if name else None
        if problem is None:
            return True
        METRICS.refused.labels(reason="bad_helo").inc()
        mail_log().info("refused", client=self._client, reason="bad_helo", helo=name)
        await self.push(f"501 5.5.4 Invalid {verb} name: {problem}")
        return False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if await self._greeting_name_ok("HELO", hostname):
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._greeting_name_ok("EHLO", hostname):
            await super().smtp_EHLO(hostname)

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
        client = self._client
        if self._limiter.blocked(client):
            METRICS.auth.labels(outcome="blocked").inc()
            self._hang_up(AUTH_BLOCKED)
            return AuthResult(success=False, handled=True)
        self._limiter.begin(client)
        try:
            ok = await self._users.check(user, pending.credentials.password)
        finally:
            self._limiter.end(client)
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

    def __dir__(self) -> list[str]:
        # aiosmtpd's SMTP.__init__ runs inspect.getmembers() and dir() on the handler for
        # every new connection, evaluating each attribute to find its handle_/auth_ hooks:
        # about a third of a connection's set-up. Those names are fixed per class.
        return _names(type(self), ("handle_", "auth_"))

    def __init__(
        self,
        *,
        settings: Callable[[], MailSettings],
        hostname: str,
        spool: Spool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._current = settings
        self._default_hostname = hostname
        self._spool = spool
        self._clock = clock
        self._networks: dict[int, tuple[MailSettings, list[Network]]] = {}
        # whether the session asking is the only one this event loop serves (see
        # `Spool.commit`); the service that counts its sessions sets it
        self.alone: Callable[[], bool] = lambda: False

    def settings(self, session: Session) -> MailSettings:
        """The settings this session began with: read from the live holder once, at its
        first command, so a reload mid-session never changes the rules under a client."""
        taken: MailSettings | None = getattr(session, "relay_settings", None)
        if taken is None:
            taken = self._current()
            session.relay_settings = taken  # type: ignore[attr-defined]
        return taken

    def hostname(self, session: Session) -> str:
        return self.settings(session).hostname or self._default_hostname

    def _allowed(self, settings: MailSettings) -> list[Network]:
        cached = self._networks.get(id(settings))
        if cached is None or cached[0] is not settings:
            cached = (settings, parse_networks(settings.allowed_networks))
            self._networks = {id(settings): cached}  # one settings version at a time
        return cached[1]

    async def handle_exception(self, error: Exception) -> str:
        """A fault of ours is a temporary condition: 4xx, so the client retries later."""
        system_log().error("session_error", error=f"{type(error).__name__}: {error}")
        return "451 4.3.0 Local error in processing, try again later"

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
        networks = self._allowed(self.settings(session))
        return address is not None and any(address in net for net in networks)

    def _refuse(self, session: Session, reason: str, reply: str, **fields: Any) -> str:
        METRICS.refused.labels(reason=reason).inc()
        mail_log().info(
            "refused", client=str(client_ip(session.peer)), reason=reason, reply=reply, **fields
        )
        return reply

    def _room_for(self, mail_options: list[str]) -> str | None:
        """452 at once when the declared SIZE is more than the spool's volume has free (as
        Postfix's queue_minfree), rather than after the client has sent it all."""
        for option in mail_options:
            key, _, value = option.partition("=")
            if key.upper() == "SIZE" and value.isdigit() and int(value) >= self._spool.free_bytes():
                return "452 4.3.1 Insufficient system storage for this message, try later"
        return None

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if (room := self._room_for(mail_options)) is not None:
            return self._refuse(session, "spool_full", room, sender=address)
        if address == "<>":
            address = ""  # the null reverse-path of reports (RFC 5321 §4.5.5)
        if problem := utf8_problem(address, bool(envelope.smtp_utf8)):
            return self._refuse(
                session, "bad_sender", f"553 5.6.7 Sender address {problem}", sender=address
            )
        if address and (problem := address_problem(address)):
            return self._refuse(
                session,
                "bad_sender",
                f"553 5.1.7 Bad sender address: {problem}",
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
        if "@" not in address and not local_part_problem(address):
            default_mail_host = self.settings(session).default_mail_host
            if default_mail_host is None:
                return self._refuse(
                    session,
                    "bare_user",
                    f"550 5.1.3 <{address}> has no domain and no defaultMailHost is set",
                    sender=envelope.mail_from,
                    recipient=address,
                )
            address = f"{address}@{default_mail_host}"
        elif problem := address_problem(address):
            return self._refuse(
                session,
                "bad_recipient",
                f"553 5.1.3 Bad recipient address: {problem}",
                sender=envelope.mail_from,
                recipient=address,
            )
        seen: set[str] = envelope.__dict__.setdefault("smtprelay_seen", set())
        if canonical(address) in seen:
            return "250 2.1.5 OK (duplicate recipient, delivered once)"
        seen.add(canonical(address))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    def begin_message(self, session: Session, envelope: Envelope) -> Draft:
        """DATA is starting: a spool draft with the envelope and our Received: header first,
        so the body can be written to it as it arrives."""
        now = self._clock()
        queue_id = self._spool.new_id(now)
        recipients = tuple(envelope.rcpt_tos)
        peer = str(client_ip(session.peer))
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        draft = self._spool.draft(
            sender=_sender(envelope),
            recipients=recipients,
            client=peer,
            queue_id=queue_id,
            options=message_options(envelope),
            recipient_options=recipient_options(envelope),
        )
        draft.add(
            received_header(
                helo=session.host_name or "",
                peer_ip=peer,
                hostname=self.hostname(session),
                protocol=protocol,
                queue_id=queue_id,
                recipient=recipients[0] if len(recipients) == 1 else "",
                now=now,
            )
        )
        return draft

    async def end_message(self, session: Session, draft: Draft, body: BodyDecoder) -> str:
        """The client sent the end of data: the reply, 250 only once the message is durable."""
        envelope = draft.envelope
        facts: dict[str, Any] = {"sender": envelope.sender, "recipients": list(envelope.recipients)}
        refusal = None
        if body.too_long:
            refusal = ("line_too_long", "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)")
        elif body.too_big:
            refusal = ("too_big", "552 5.3.4 Message size exceeds the maximum allowed")
        elif body.hops > MAX_HOPS:
            refusal = ("loop", f"554 5.4.6 Too many hops ({body.hops}): mail loop suspected")
        if refusal is not None:
            draft.discard()
            return self._refuse(session, *refusal, **facts)
        try:
            stored = await self._spool.commit(draft, alone=self.alone(), hold=True)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return self._refuse(
                    session,
                    "spool_full",
                    "452 4.3.1 Insufficient system storage, try later",
                    **facts,
                )
            return self._refuse(
                session,
                "spool_error",
                f"451 4.3.0 Local error in processing: {error.strerror}",
                **facts,
            )
        METRICS.accepted.inc()
        # The message is durable. The log line and letting go of the file (which starts
        # its delivery) wait for the session's next reply: RelaySMTP._replied.
        after: list[Callable[[], None]] = session.__dict__.setdefault("after_reply", [])
        after.append(
            functools.partial(
                mail_log().info,
                "accepted",
                queue_id=stored.id,
                client=stored.client,
                helo=session.host_name,
                size=body.size,
                bare_newlines=body.bare_newlines,
                **facts,
            )
        )
        after.append(functools.partial(self._spool.release, draft))
        return f"250 2.0.0 Ok: queued as {stored.id}"


def _sender(envelope: Envelope) -> str:
    return "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
