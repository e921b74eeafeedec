"""A message's envelope: who it is from and for, fixed at acceptance, and the JSON line that
opens its queue file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from smtprelay.dsn import MailOptions, RecipientOptions


@dataclass(frozen=True)
class Envelope:
    """Who a message is from and for, fixed at acceptance."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    received: float
    client: str = ""
    options: MailOptions = field(default_factory=MailOptions)
    # NOTIFY/ORCPT per recipient, in the order of recipients; () when no RCPT carried any.
    recipient_options: tuple[RecipientOptions, ...] = ()

    def options_of(self, recipient: str) -> RecipientOptions:
        if self.recipient_options:
            for address, options in zip(self.recipients, self.recipient_options, strict=True):
                if address == recipient:
                    return options
        return RecipientOptions()


def encode_envelope(envelope: Envelope) -> bytes:
    header = {
        "id": envelope.id,
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "received": envelope.received,
        "client": envelope.client,
    }
    # Written only when present, so envelopes stay what older relays wrote and read.
    if options := envelope.options.to_json():
        header["options"] = options
    if envelope.recipient_options:
        header["recipient_options"] = [o.to_json() for o in envelope.recipient_options]
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


def decode_envelope(line: bytes) -> Envelope:
    return envelope_of(json.loads(line))


def envelope_of(header: dict[str, Any]) -> Envelope:
    return Envelope(
        id=header["id"],
        sender=header["sender"],
        recipients=tuple(header["recipients"]),
        received=header["received"],
        client=header.get("client", ""),
        options=MailOptions.from_json(header.get("options")),
        recipient_options=tuple(
            RecipientOptions.from_json(o) for o in header.get("recipient_options", ())
        ),
    )
