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
from email.policy import SMTP

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
    action: str = "failed"  # or "delayed": still queued, still being retried


def _delayed(failures: list[Failure]) -> bool:
    return all(failure.action == "delayed" for failure in failures)


def original_headers(data: bytes) -> bytes:
    """The header block of a message (everything before the first blank line)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, _ = data.partition(separator)
        if found:
            return head + separator[: len(separator) // 2]
    return data


def _text_part(failures: list[Failure], hostname: str) -> str:
    if _delayed(failures):
        intro = [
            "Your message has not been delivered yet to the following recipients.",
            "The relay keeps trying; you will hear again only if it gives up.",
        ]
    else:
        intro = ["Your message could not be delivered to the following recipients:"]
    lines = [f"This is the mail relay at {hostname}.", "", *intro, ""]
    lines += [f"  <{one_line(f.recipient)}>: {one_line(f.diagnostic)}" for f in failures]
    lines += ["", "The headers of your message are attached."]
    return "\n".join(lines) + "\n"


def _status_part(
    *, queue_id: str, failures: list[Failure], hostname: str, arrival: float
) -> Message:
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-SMTPRelay-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival)
    part = MIMEBase("message", "delivery-status")
    part.attach(per_message)
    for failure in failures:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {one_line(failure.recipient)}"
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
) -> bytes:
    """The report for ``sender`` about ``failures``, from MAILER-DAEMON at ``hostname``."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = one_line(sender)
    report["Subject"] = (
        "Delayed Mail (still being retried)"
        if _delayed(failures)
        else "Undelivered Mail Returned to Sender"
    )
    report["Date"] = email.utils.formatdate(now)
    report["Message-ID"] = email.utils.make_msgid(idstring=queue_id, domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    text = _text_part(failures, hostname)
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))
    report.attach(
        _status_part(queue_id=queue_id, failures=failures, hostname=hostname, arrival=arrival)
    )
    attached = Message()
    attached["Content-Type"] = "text/rfc822-headers"
    attached.set_payload(headers.decode("utf-8", "replace"))
    report.attach(attached)
    return report.as_bytes(policy=SMTP)


def status_for(code: int, text: str) -> str:
    """The enhanced status code in a reply, else one derived from its basic code."""
    first = text.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] in "245":
        return first
    return f"{code // 100}.0.0"
