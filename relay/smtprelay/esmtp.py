"""ESMTP parameters at the front door: DSN kept in the case the client sent, SMTPUTF8
addresses checked (RFC 6531), BODY noted; handed to the spool as :mod:`smtprelay.dsn` types.

aiosmtpd upper-cases MAIL and RCPT parameters and refuses those it does not know, so DSN's
(case-sensitive ENVID and ORCPT among them) are taken off the command before aiosmtpd parses
it, validated, and kept on the session's envelope once the command is accepted.
"""

from __future__ import annotations

from aiosmtpd.smtp import SMTP, Envelope, syntax

from smtprelay import dsn


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

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()
