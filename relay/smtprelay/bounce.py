"""RFC 3464 delivery status notifications: what returns undeliverable mail to its sender.

Pure: envelope and failures in, message bytes out; the scheduler enqueues the result with a
null envelope sender so that a report can never cause another report.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP, SMTPUTF8

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]+")
DIAGNOSTIC_MAX = 900  # a remote reply is quoted, not copied whole


def one_line(text: str) -> str:
    """``text`` as one line of printable characters: a remote server's multi-line reply
    (``550-...``/``550 Action: delivered``) is quoted in a report, never parsed as fields."""
    flat = _CONTROLS.sub(" ", text).strip()
    return flat if len(flat) <= DIAGNOSTIC_MAX else flat[: DIAGNOSTIC_MAX - 3] + "..."


@dataclass(frozen=True)
class Failure:
    """One recipient that could not be delivered, and why."""

    recipient: str
    status: str  # RFC 3463 enhanced status code, e.g. 5.1.1
    diagnostic: str  # the remote reply or our own reason
    remote_mta: str = ""
    action: str = "failed"  # "delayed": still being retried; "relayed": to a non-DSN hop
    original_recipient: str = ""  # the client's ORCPT (addr-type;xtext), if any


def address_field(address: str) -> str:
    """``rfc822; addr``, or for an internationalised address RFC 6533's ``utf-8`` type with
    its non-ASCII characters as ``\\x{HEX}``, so the status part stays 7-bit."""
    if address.isascii():
        return f"rfc822; {address}"
    escaped = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {escaped}"


_INTRO = {
    "failed": ["Your message could not be delivered to the following recipients:"],
    "delayed": [
        "Your message has not been delivered yet to the following recipients.",
        "The relay keeps trying; you will hear again only if it gives up.",
    ],
    "relayed": [
        "Your message was relayed to the following recipients through a system that",
        "does not return delivery notices; you asked (NOTIFY=SUCCESS) to be told:",
    ],
}
_SUBJECT = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Relay Report",
}


def _action(failures: list[Failure]) -> str:
    """What one report is about: every entry of a report has the same action."""
    return failures[0].action


def original_headers(data: bytes) -> bytes:
    """The header block of a message (everything before the first blank line)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, _ = data.partition(separator)
        if found:
            return head + separator[: len(separator) // 2]
    return data


def _text_part(failures: list[Failure], hostname: str) -> str:
    intro = _INTRO[_action(failures)]
    lines = [f"This is the mail relay at {hostname}.", "", *intro, ""]
    lines += [f"  <{one_line(f.recipient)}>: {one_line(f.diagnostic)}" for f in failures]
    lines += ["", "Your message (or its headers) is attached."]
    return "\n".join(lines) + "\n"


def _status_part(
    *, queue_id: str, failures: list[Failure], hostname: str, arrival: float, envid: str
) -> Message:
    per_message = Message()
    if envid:
        per_message["Original-Envelope-Id"] = envid
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-SMTPRelay-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival)
    part = MIMEBase("message", "delivery-status")
    part.attach(per_message)
    for failure in failures:
        block = Message()
        if failure.original_recipient:
            kind, _, address = failure.original_recipient.partition(";")
            block["Original-Recipient"] = f"{kind}; {one_line(address)}"
        block["Final-Recipient"] = address_field(one_line(failure.recipient))
        block["Action"] = failure.action
        block["Status"] = failure.status
        if failure.remote_mta:
            block["Remote-MTA"] = f"dns; {one_line(failure.remote_mta)}"
        block["Diagnostic-Code"] = f"smtp; {one_line(failure.diagnostic)}"
        part.attach(block)
    return part


def build_report(
    *,
    queue_id: str,
    sender: str,
    failures: list[Failure],
    headers: bytes,
    hostname: str,
    arrival: float,
    now: float,
    envid: str = "",
    full: bytes | None = None,
) -> bytes:
    """The report for ``sender`` about ``failures``, from MAILER-DAEMON at ``hostname``;
    ``full`` (RET=FULL) is attached whole, else only ``headers`` (RET=HDRS, the default)."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = one_line(sender)
    report["Subject"] = _SUBJECT[_action(failures)]
    report["Date"] = email.utils.formatdate(now)
    report["Message-ID"] = email.utils.make_msgid(idstring=queue_id, domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    text = _text_part(failures, hostname)
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))
    report.attach(
        _status_part(
            queue_id=queue_id, failures=failures, hostname=hostname, arrival=arrival, envid=envid
        )
    )
    attached = Message()
    if full is not None:
        attached["Content-Type"] = "message/rfc822"
        attached.set_payload(full.decode("utf-8", "replace"))
    else:
        attached["Content-Type"] = "text/rfc822-headers"
        attached.set_payload(headers.decode("utf-8", "replace"))
    report.attach(attached)
    # An internationalised sender or original gets an SMTPUTF8 report (RFC 6533 spirit).
    ascii_only = sender.isascii() and headers.isascii() and (full is None or full.isascii())
    return report.as_bytes(policy=SMTP if ascii_only else SMTPUTF8)


def status_for(code: int, text: str) -> str:
    """The enhanced status code in a reply, else one derived from its basic code."""
    first = text.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] in "245":
        return first
    return f"{code // 100}.0.0"
