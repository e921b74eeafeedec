"""Building and sending test messages with the standard library's SMTP client."""

from __future__ import annotations

import smtplib
import threading
from email import policy
from email.message import EmailMessage


def message(
    sender: str, recipients: list[str], subject: str = "hello", body: str = "hi\n"
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender or "nobody@relay.test"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@client.test>"
    msg.set_content(body)
    return msg.as_bytes(policy=policy.SMTP)


def send(
    port: int,
    sender: str,
    recipients: list[str],
    *,
    subject: str = "hello",
    data: bytes | None = None,
    source: str = "127.0.0.1",
) -> str:
    """Send one message through the relay; returns the 250 reply text (with the queue id)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as client:
        client.ehlo("client.test")
        code, reply = client.mail(sender)
        assert code == 250, (code, reply)
        for recipient in recipients:
            code, reply = client.rcpt(recipient)
            assert code == 250, (code, reply)
        code, reply = client.data(
            data if data is not None else message(sender, recipients, subject)
        )
        assert code == 250, (code, reply)
        return reply.decode()


class Sender:
    """A client sending one message every 100 ms, recording every outcome."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        number = 0
        while not self._stop.wait(0.1):
            number += 1
            subject = f"message {number}"
            try:
                send(self.port, "app@sender.test", ["bob@example.test"], subject=subject)
                self.sent.append(subject)
            except Exception as error:
                self.errors.append(f"{subject}: {error!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
