"""The SMTP client: one connection per destination carries all of its recipients.

Replies are classified per recipient (RFC 5321 §4.2.1): 2xx delivered, 4xx and connection
failures deferred, 5xx failed. STARTTLS is used whenever the peer offers it (opportunistic,
unverified, as for MX delivery in general; a failed handshake is retried in plaintext within
the attempt, RFC 7435); it is required before AUTH at a gateway, so a
gateway that does not offer it defers the mail rather than receive the password in clear.
With ``logging.debug`` the client writes a transcript (see :mod:`smtprelay.transcript`).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiosmtplib

from smtprelay.spool import MessageFile
from smtprelay.transcript import TranscribingSMTP

Outcome = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True)
class Result:
    """What became of one recipient on one attempt."""

    outcome: Outcome
    code: int
    text: str
    host: str = ""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


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


Transcript = Callable[[str, str], None]


class _TlsFailed(Exception):
    """The STARTTLS handshake (or the command) failed after the peer offered it."""


async def _secure(client: aiosmtplib.SMTP, *, required: bool, wanted: bool) -> None:
    """STARTTLS when the peer offers it (``wanted``), or always (``required``)."""
    await client.ehlo()
    if required or (wanted and client.supports_extension("starttls")):
        try:
            await client.starttls()
        except (aiosmtplib.SMTPException, OSError) as error:
            where = f"{client.hostname}:{client.port}"
            raise _TlsFailed(f"{where}: STARTTLS failed: {error}") from error


async def _deliver_once(
    *,
    address: str,
    port: int,
    helo: str,
    sender: str,
    recipients: tuple[str, ...],
    data: MessageFile,
    credentials: Credentials | None,
    timeout: float,
    tls: bool,
) -> dict[str, Result]:
    client = TranscribingSMTP(
        hostname=address,
        port=port,
        local_hostname=helo,
        timeout=timeout,
        start_tls=False,
        validate_certs=False,
        tls_context=_unverified_context(),
    )
    await client.connect()
    try:
        await _secure(client, required=credentials is not None, wanted=tls)
        if credentials is not None:
            await client.login(credentials.username, credentials.password)
        await client.mail(sender)
        results: dict[str, Result] = {}
        accepted: list[str] = []
        for recipient in recipients:
            try:
                reply = await client.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as error:
                results[recipient] = Result(
                    classify(error.code), error.code, error.message, address
                )
            except ValueError as error:  # a spooled address aiosmtplib will not send
                results[recipient] = Result("failed", 553, f"5.1.3 {error}", address)
            else:
                accepted.append(recipient)
                results[recipient] = Result("delivered", reply.code, reply.message, address)
        if accepted:
            try:
                reply = await client.send_file(data, timeout=timeout)
            except aiosmtplib.SMTPResponseException as error:
                for recipient in accepted:
                    results[recipient] = Result(
                        classify(error.code), error.code, error.message, address
                    )
            else:
                for recipient in accepted:
                    results[recipient] = Result("delivered", reply.code, reply.message, address)
        return results
    finally:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


async def deliver(
    *,
    addresses: tuple[str, ...],
    port: int,
    helo: str,
    sender: str,
    recipients: tuple[str, ...],
    data: MessageFile,
    credentials: Credentials | None = None,
    timeout: float = 60.0,
) -> dict[str, Result]:
    """Deliver to the first address that takes the transaction; try the next on failure.

    A connection failure, a refusing greeting or a 4xx to MAIL FROM moves on to the next
    address (RFC 5321 §5.1); a 5xx to MAIL FROM fails every recipient.
    """
    last = Result("deferred", 451, "no address to deliver to")
    for address in addresses:
        once = functools.partial(
            _deliver_once,
            address=address,
            port=port,
            helo=helo,
            sender=sender,
            recipients=recipients,
            data=data,
            credentials=credentials,
            timeout=timeout,
        )
        try:
            try:
                return await once(tls=True)
            except _TlsFailed as error:
                if credentials is not None:
                    raise
                # Opportunistic TLS (RFC 7435): a failed handshake is retried in plaintext.
                last = Result("deferred", 451, str(error), address)
                return await once(tls=False)
        except _TlsFailed as error:
            last = Result("deferred", 451, str(error), address)
        except aiosmtplib.SMTPSenderRefused as error:
            last = Result(classify(error.code), error.code, error.message, address)
            if last.outcome == "failed":
                break
        except aiosmtplib.SMTPResponseException as error:
            # A refusing greeting or AUTH is the destination's (or our config's) problem to
            # fix, not a verdict on the message: defer.
            last = Result("deferred", error.code, error.message, address)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            last = Result("deferred", 451, f"{address}:{port}: {error}", address)
    return dict.fromkeys(recipients, last)
