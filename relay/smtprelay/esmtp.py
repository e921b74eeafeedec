"""ESMTP parameters at the front door: DSN kept in the case the client sent, SMTPUTF8
addresses checked (RFC 6531), BODY noted; handed to the spool as :mod:`smtprelay.dsn` types.

aiosmtpd upper-cases MAIL and RCPT parameters and refuses those it does not know, so DSN's
(case-sensitive ENVID and ORCPT among them) are taken off the command before aiosmtpd parses
it, validated, and kept on the session's envelope once the command is accepted.
"""

from __future__ import annotations

import re

from aiosmtpd.smtp import SMTP, Envelope, syntax

from smtprelay import dsn

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# <dot-atom@domain> then the rest of the command: what get_angle_addr returns for it.
_PLAIN_ANGLE_ADDR = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>[ \t]*+(?!\()(.*)\Z", re.S
)


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the DSN parameters, kept in their original case."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn_ret = ""
        self.dsn_envid = ""
        self.dsn_rcpts: list[dsn.RecipientOptions] = []


def message_options(envelope: Envelope) -> dsn.MailOptions:
    """What MAIL FROM asked for (DSN RET/ENVID, SMTPUTF8, BODY), as the spool keeps it."""
    relay = envelope if isinstance(envelope, RelayEnvelope) else RelayEnvelope()
    return dsn.MailOptions(
        ret=relay.dsn_ret,
        envid=relay.dsn_envid,
        smtputf8=bool(envelope.smtp_utf8),
        body="8BITMIME" if "BODY=8BITMIME" in envelope.mail_options else "",
    )


def recipient_options(envelope: Envelope) -> tuple[dsn.RecipientOptions, ...]:
    """Each recipient's NOTIFY/ORCPT, in rcpt_tos order; () when no RCPT carried any."""
    options = envelope.dsn_rcpts if isinstance(envelope, RelayEnvelope) else []
    if all(option == dsn.RecipientOptions() for option in options):
        return ()
    return tuple(options)


def utf8_problem(address: str, smtputf8: bool) -> str | None:
    """Why a non-ASCII address cannot be taken (RFC 6531), or None."""
    if address.isascii():
        return None
    if not smtputf8:
        return "is not ASCII: send MAIL FROM with SMTPUTF8"
    try:
        address.encode("utf-8")  # aiosmtpd keeps invalid bytes as surrogates
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def ascii_form(address: str) -> str:
    """The address with its domain in A-labels (IDNA), for the syntax check."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address  # the syntax check refuses it


class EsmtpParameters(SMTP):
    """aiosmtpd's MAIL and RCPT, with the DSN parameters taken and kept."""

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        try:
            arg, found = dsn.split_dsn(arg or "")
            ret, envid = dsn.mail_parameters(found)
        except dsn.ParameterError as error:
            await self.push(str(error))
            return
        envelope = self.envelope
        await super().smtp_MAIL(arg)
        if isinstance(envelope, RelayEnvelope) and envelope.mail_from:  # accepted
            envelope.dsn_ret, envelope.dsn_envid = ret, envid

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        try:
            arg, found = dsn.split_dsn(arg or "")
            options = dsn.rcpt_parameters(found)
        except dsn.ParameterError as error:
            await self.push(str(error))
            return
        envelope = self.envelope
        before = len(envelope.rcpt_tos) if envelope is not None else 0
        await super().smtp_RCPT(arg)
        if isinstance(envelope, RelayEnvelope) and len(envelope.rcpt_tos) > before:
            envelope.dsn_rcpts.append(options)  # accepted: one entry per rcpt_tos entry

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, with a fast path for the plain ``<local@domain>`` of
        nearly every MAIL and RCPT: aiosmtpd defines a typing Protocol class on every call
        and runs the full RFC 5322 parser, together about a tenth of a transaction's CPU.
        Anything but a dot-atom local part and a plain domain takes aiosmtpd's path, so the
        result is the same as aiosmtpd's, except that input on which the standard library's
        parser crashes (``MAIL FROM:<`` raises IndexError) is a syntax error (501), not a
        fault of the relay's (451)."""
        match = _PLAIN_ANGLE_ADDR.match(arg)
        if match is None:
            try:
                return super()._getaddr(arg)
            except (IndexError, ValueError, TypeError):
                return None, None
        address = match.group(1)
        limit = getattr(self, "local_part_limit", 0)
        if limit and address.rfind("@") > limit:
            return None, None
        return address, match.group(2)

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()
