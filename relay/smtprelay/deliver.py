"""The SMTP client: one connection per destination carries all of its recipients.

Replies are classified per recipient (RFC 5321 §4.2.1): 2xx delivered, 4xx and connection
failures deferred, 5xx failed. TLS follows the destination's policy (RFC 7435 levels, as
Postfix's ``smtp_tls_security_level``): ``none``; ``may`` (STARTTLS when offered,
unverified, and plaintext again on a fresh connection after a failed handshake); ``encrypt``
(TLS required, unverified); ``verify`` (TLS required, chain and host name checked, SNI sent).
The relay connects to the address it resolved itself but hands the TLS layer the host
*name*, so SNI and the name check see what the user configured. Credentials go only over a
verified channel, or an encrypted one under an explicit ``encrypt``; never in plaintext.
With ``logging.debug`` the client writes a transcript (see :mod:`smtprelay.transcript`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from smtprelay import pipeline
from smtprelay.commands import Carried, command_line, mail_parameters, rcpt_parameters
from smtprelay.config import TlsLevel
from smtprelay.dsn import RecipientOptions
from smtprelay.scache import ConnectionCache, Session, quit_politely
from smtprelay.sendbody import RefusedAfterDot, send_body
from smtprelay.spool import MessageFile
from smtprelay.transcript import TranscribingSMTP

Outcome = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True)
class Result:
    """What became of one recipient on one attempt."""

    outcome: Outcome
    code: int
    text: str
    host: str = ""  # the address the relay talked to
    tls: str = ""  # "verified", "encrypted" or "" (plaintext) for the connection used
    name: str = ""  # that host's name (MX, gateway), as a certificate would carry it
    dsn: bool = False  # the host offered DSN, so it reports on the recipient from now on


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class Target:
    """One host to try: ``name`` is what its certificate must carry (and SNI), ``address``
    where the relay connects."""

    name: str
    address: str
    port: int


@dataclass(frozen=True)
class Policy:
    """How to talk to a destination: its TLS level and what authenticates the relay."""

    tls: TlsLevel = "may"
    implicit_tls: bool = False
    ca_file: Path | None = None
    credentials: Credentials | None = None


def classify(code: int) -> Outcome:
    if 200 <= code < 300:
        return "delivered"
    if 500 <= code < 600:
        return "failed"
    return "deferred"


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    """One context for the process: building one loads the CA bundle (~30 ms of CPU), far
    more than the rest of a delivery costs, and none is needed to verify nothing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.lru_cache(maxsize=16)
def _verifying_context(ca_file: str | None, _stamp: float) -> ssl.SSLContext:
    """Chain and host name checked; keyed by the bundle's mtime so a renewed CA Secret is
    picked up without a restart."""
    return ssl.create_default_context(cafile=ca_file)


def tls_context(level: TlsLevel, ca_file: Path | None) -> ssl.SSLContext:
    if level != "verify":
        return _unverified_context()
    stamp = ca_file.stat().st_mtime if ca_file is not None else 0.0
    return _verifying_context(str(ca_file) if ca_file is not None else None, stamp)


Transcript = Callable[[str, str], None]


class _Deferred(Exception):
    """The destination cannot be used on this connection: defer with ``reason``."""

    def __init__(self, code: int, reason: str, *, handshake: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.handshake = handshake  # the TLS handshake itself failed


async def _connect(target: Target, timeout: float) -> socket.socket:
    """A TCP connection to the resolved address; TLS and SMTP go over it by name."""
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (target.address, target.port)),
            timeout,
        )
    except BaseException:
        sock.close()
        raise
    return sock


async def _secure(client: TranscribingSMTP, target: Target, policy: Policy, level: TlsLevel) -> str:
    """STARTTLS as ``level`` asks; returns "verified", "encrypted" or "" (plaintext)."""
    if policy.implicit_tls:
        return "verified" if level == "verify" else "encrypted"
    if level == "none":
        return ""
    await client.ehlo()
    if not client.supports_extension("starttls"):
        if level in ("encrypt", "verify"):
            raise _Deferred(
                451, f"4.7.5 {target.name} does not offer STARTTLS, which tls: {level} requires"
            )
        return ""
    try:
        await client.starttls(
            server_hostname=target.name, tls_context=tls_context(level, policy.ca_file)
        )
    except (ssl.SSLError, ssl.CertificateError, aiosmtplib.SMTPException, OSError) as error:
        raise _Deferred(
            451, f"4.7.5 TLS with {target.name} failed: {error}", handshake=True
        ) from None
    await client.ehlo()
    return "verified" if level == "verify" else "encrypted"


async def _transaction(
    session: Session,
    sender: str,
    recipients: tuple[str, ...],
    data: MessageFile,
    template: Result,
    carried: Carried,
) -> dict[str, Result]:
    """MAIL, RCPT per recipient, DATA for those accepted; a result per recipient. The
    session is marked clean again only once the message's final reply has come."""
    client = session.client
    session.clean = False

    def result(outcome: Outcome, code: int, text: str) -> Result:
        return replace(template, outcome=outcome, code=code, text=text)

    if client.last_ehlo_response is None and client.last_helo_response is None:
        await client.ehlo()
    template = replace(template, dsn=client.supports_extension("dsn"))
    parameters = mail_parameters(client, carried)
    if isinstance(parameters, str):
        code, _, text = parameters.partition(" ")
        session.clean = True  # nothing was sent
        return dict.fromkeys(recipients, result("failed", int(code), text))
    encoding = "utf-8" if carried.options.smtputf8 else "ascii"
    envelope = _Envelope(sender, recipients, carried, parameters, encoding, result)
    if client.supports_extension("pipelining"):
        results, accepted, started = await _pipelined(client, envelope)
    else:
        results, accepted = await _one_by_one(client, envelope)
        started = False
    if accepted:
        try:
            reply = await _send(client, data, started=started)
        except aiosmtplib.SMTPResponseException as error:
            for recipient in accepted:
                results[recipient] = result(classify(error.code), error.code, error.message)
            session.clean = isinstance(error, RefusedAfterDot)
        else:
            session.clean = True
            for recipient in accepted:
                results[recipient] = result("delivered", reply.code, reply.message)
    return results


@dataclass(frozen=True)
class _Envelope:
    """One transaction's MAIL and RCPTs, and how a reply becomes a recipient's result."""

    sender: str
    recipients: tuple[str, ...]
    carried: Carried
    parameters: list[str]  # of MAIL FROM
    encoding: str
    result: Callable[[Outcome, int, str], Result]


async def _one_by_one(
    client: aiosmtplib.SMTP, envelope: _Envelope
) -> tuple[dict[str, Result], list[str]]:
    """MAIL, then each RCPT, each waiting for its reply: results so far, and who was accepted."""
    result, encoding = envelope.result, envelope.encoding
    await client.mail(envelope.sender, options=envelope.parameters, encoding=encoding)
    results: dict[str, Result] = {}
    accepted: list[str] = []
    for recipient in envelope.recipients:
        options = envelope.carried.recipients.get(recipient, RecipientOptions())
        try:
            reply = await client.rcpt(
                recipient, options=rcpt_parameters(client, options), encoding=encoding
            )
        except aiosmtplib.SMTPRecipientRefused as error:
            results[recipient] = result(classify(error.code), error.code, error.message)
        except ValueError as error:  # a spooled address aiosmtplib will not send
            results[recipient] = result("failed", 553, f"5.1.3 {error}")
        else:
            accepted.append(recipient)
            results[recipient] = result("delivered", reply.code, reply.message)
    return results, accepted


async def _pipelined(
    client: aiosmtplib.SMTP, envelope: _Envelope
) -> tuple[dict[str, Result], list[str], bool]:
    """MAIL, every RCPT and DATA in one write (RFC 2920); as `_one_by_one`, and whether the
    data may follow (DATA was answered 354 and someone was accepted)."""
    sender, recipients, carried, encoding, result = (
        envelope.sender,
        envelope.recipients,
        envelope.carried,
        envelope.encoding,
        envelope.result,
    )
    mail = command_line(b"MAIL FROM:", sender, envelope.parameters, encoding)
    results: dict[str, Result] = {}
    lines: list[bytes] = []
    sent: list[str] = []
    for recipient in recipients:
        options = carried.recipients.get(recipient, RecipientOptions())
        try:
            lines.append(
                command_line(b"RCPT TO:", recipient, rcpt_parameters(client, options), encoding)
            )
        except ValueError as error:  # a spooled address aiosmtplib will not send
            results[recipient] = result("failed", 553, f"5.1.3 {error}")
        else:
            sent.append(recipient)
    if not sent:
        return results, [], False
    batch = [mail, *lines, b"DATA"]
    replies = await pipeline.batch(client, batch, timeout=client.timeout)
    if isinstance(client, TranscribingSMTP):
        client.transcribe(batch, replies)
    first, data = replies[0], replies[-1]
    accepted: list[str] = []
    if first.code == 250:
        for recipient, reply in zip(sent, replies[1:-1], strict=True):
            if reply.code in (250, 251):
                accepted.append(recipient)
            results[recipient] = result(classify(reply.code), reply.code, reply.message)
    if data.code == 354 and not accepted:
        # DATA taken with nobody to deliver to: end it empty at once, as Postfix does; the
        # session is not clean (RSET before it carries another message).
        with contextlib.suppress(aiosmtplib.SMTPResponseException):
            await send_body(client, [], timeout=client.timeout, started=True)
    if first.code != 250:
        raise aiosmtplib.SMTPSenderRefused(first.code, first.message, sender)
    if accepted and data.code != 354:
        for recipient in accepted:
            results[recipient] = result(classify(data.code), data.code, data.message)
        return results, [], False
    return results, accepted, True


async def _send(client: aiosmtplib.SMTP, data: MessageFile, *, started: bool) -> SMTPResponse:
    """DATA streamed from the spool file (see :mod:`smtprelay.sendbody`); ``started``: DATA
    was sent and answered 354 already, pipelined."""
    if isinstance(client, TranscribingSMTP):
        return await client.send_file(data, timeout=client.timeout, started=started)
    return await send_body(client, data.pieces(), timeout=client.timeout, started=started)


async def _open(
    *, target: Target, policy: Policy, level: TlsLevel, helo: str, timeout: float
) -> Session:
    """A new session: connect, greeting, EHLO, STARTTLS and AUTH as the policy asks."""
    sock = await _connect(target, timeout)
    client = TranscribingSMTP(
        hostname=target.name,
        sock=sock,
        peer=f"{target.address}:{target.port}",
        local_hostname=helo,
        timeout=timeout,
        use_tls=policy.implicit_tls,
        start_tls=False,
        tls_context=tls_context(level, policy.ca_file) if policy.implicit_tls else None,
    )
    try:
        await client.connect()
    except BaseException:
        sock.close()
        raise
    try:
        channel = await _secure(client, target, policy, level)
        if policy.credentials is not None:
            # The config refuses credentials with none/may; this is the last line of defence.
            if channel == "" or level not in ("verify", "encrypt"):
                raise _Deferred(451, f"4.7.0 credentials for {target.name} need TLS")
            await client.login(policy.credentials.username, policy.credentials.password)
    except BaseException:
        await quit_politely(client)
        raise
    return Session(client, channel, time.monotonic())


async def _deliver_once(
    *,
    target: Target,
    policy: Policy,
    level: TlsLevel,
    helo: str,
    sender: str,
    recipients: tuple[str, ...],
    data: MessageFile,
    carried: Carried,
    timeout: float,
    cache: ConnectionCache | None,
) -> dict[str, Result]:
    key = (target, policy, level)
    session = await cache.take(key) if cache is not None else None
    reused = session is not None
    if session is None:
        session = await _open(target=target, policy=policy, level=level, helo=helo, timeout=timeout)
    finished = False
    try:
        template = Result("delivered", 0, "", target.address, session.channel, target.name)
        try:
            results = await _transaction(session, sender, recipients, data, template, carried)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPSenderRefused) as error:
            if not reused or (
                isinstance(error, aiosmtplib.SMTPSenderRefused) and error.code != 421
            ):
                raise
            # a cached session the server closed while it was idle (EOF, or 421 on MAIL):
            # this message goes on over a new connection, as Postfix does
            session.client.close()
            session = await _open(
                target=target, policy=policy, level=level, helo=helo, timeout=timeout
            )
            template = replace(template, tls=session.channel)
            results = await _transaction(session, sender, recipients, data, template, carried)
        finished = True
        return results
    finally:
        # a session whose transaction ended with a reply (any reply) can carry the next one
        if not (finished and cache is not None and cache.put(key, session)):
            await quit_politely(session.client)


async def _try_target(
    *,
    target: Target,
    policy: Policy,
    helo: str,
    sender: str,
    recipients: tuple[str, ...],
    data: MessageFile,
    carried: Carried,
    timeout: float,
    cache: ConnectionCache | None,
) -> dict[str, Result]:
    """One host; under ``may`` a failed handshake is followed by plaintext on a fresh
    connection in the same attempt (as Postfix does), since unverified TLS protects only
    against passive listeners and the mail must not wait for a broken TLS stack."""
    level: TlsLevel = policy.tls

    def failed(outcome: Outcome, code: int, text: str) -> dict[str, Result]:
        return dict.fromkeys(
            recipients, Result(outcome, code, text, target.address, "", target.name)
        )

    while True:
        try:
            return await _deliver_once(
                target=target,
                policy=policy,
                level=level,
                helo=helo,
                sender=sender,
                recipients=recipients,
                data=data,
                carried=carried,
                timeout=timeout,
                cache=cache,
            )
        except _Deferred as refused:
            if refused.handshake and level == "may" and policy.credentials is None:
                level = "none"
                continue
            return failed("deferred", refused.code, refused.reason)
        except aiosmtplib.SMTPSenderRefused as error:
            return failed(classify(error.code), error.code, error.message)
        except aiosmtplib.SMTPResponseException as error:
            # A refusing greeting or AUTH is the destination's (or our config's) problem to
            # fix, not a verdict on the message: defer.
            return failed("deferred", error.code, error.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            reason = (
                f"{target.name or target.address}:{target.port}: {error or type(error).__name__}"
            )
            return failed("deferred", 451, reason)


async def deliver(
    *,
    targets: tuple[Target, ...],
    policy: Policy,
    helo: str,
    sender: str,
    recipients: tuple[str, ...],
    data: MessageFile,
    carried: Carried | None = None,
    timeout: float = 60.0,
    cache: ConnectionCache | None = None,
) -> dict[str, Result]:
    """Try ``targets`` in order within this one attempt, each with what is still deferred.

    A connection failure, a TLS failure under encrypt/verify, a refusing greeting or a 4xx
    moves the deferred recipients on to the next host (RFC 5321 §5.1; Postfix's relayhost
    list); delivered and failed ones are settled. A 5xx to MAIL FROM fails every recipient.
    With a ``cache``, a host's session is reused for the next message (see scache).
    """
    results: dict[str, Result] = dict.fromkeys(
        recipients, Result("deferred", 451, "4.4.0 no address to deliver to")
    )
    pending = recipients
    for target in targets:
        outcome = await _try_target(
            target=target,
            policy=policy,
            helo=helo,
            sender=sender,
            recipients=pending,
            data=data,
            carried=carried or Carried(),
            timeout=timeout,
            cache=cache,
        )
        results.update(outcome)
        pending = tuple(r for r in pending if results[r].outcome == "deferred")
        if not pending:
            break
    return results
