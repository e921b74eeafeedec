"""ESMTP parameters a message carries along: DSN (RFC 3461), SMTPUTF8 (RFC 6531) and
BODY=8BITMIME (RFC 6152).

Pure: the front door parses them once into these types (refusing what is malformed), the
spool stores them with the envelope, delivery passes them on to hops that offer the
extensions, and the relay's own reports honour NOTIFY, RET, ENVID and ORCPT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

NOTIFY_KINDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # RFC 3461 §4.2 (after decoding); generous for the encoded form
_XTEXT = re.compile(r"^([\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_DSN_PARAMETER = re.compile(r"\s+(RET|ENVID|NOTIFY|ORCPT)=(\S*)", re.IGNORECASE)


class ParameterError(ValueError):
    """A malformed DSN parameter; the message is the SMTP reply text after the code."""


@dataclass(frozen=True)
class MailOptions:
    """MAIL FROM parameters kept with the message."""

    ret: str = ""  # "", "FULL" or "HDRS"
    envid: str = ""  # xtext, as the client sent it
    smtputf8: bool = False
    body: str = ""  # "" (7BIT) or "8BITMIME"

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if value}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> MailOptions:
        data = data or {}
        return cls(
            ret=str(data.get("ret", "")),
            envid=str(data.get("envid", "")),
            smtputf8=bool(data.get("smtputf8", False)),
            body=str(data.get("body", "")),
        )


@dataclass(frozen=True)
class RecipientOptions:
    """RCPT TO parameters of one recipient."""

    notify: tuple[str, ...] = ()  # () not given; ("NEVER",) or kinds from NOTIFY_KINDS
    orcpt: str = ""  # "rfc822;addr" in xtext, as the client sent it

    def wants(self, kind: str) -> bool:
        """Whether the sender asked for (or by default gets) a report of ``kind``."""
        if not self.notify:
            return kind in ("FAILURE", "DELAY")  # RFC 3461 §4.1: the default
        return kind in self.notify

    def to_json(self) -> dict[str, Any]:
        return {"notify": list(self.notify), "orcpt": self.orcpt}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecipientOptions:
        return cls(notify=tuple(data.get("notify", ())), orcpt=str(data.get("orcpt", "")))


def split_dsn(arg: str) -> tuple[str, dict[str, str]]:
    """``arg`` without its DSN parameters, and those parameters (keys upper case, values as
    sent: ENVID and ORCPT are case-sensitive, which aiosmtpd's parser would not keep)."""
    found: dict[str, str] = {}

    def take(match: re.Match[str]) -> str:
        key = match.group(1).upper()
        if key in found:
            raise ParameterError(f"501 5.5.4 {key} given twice")
        found[key] = match.group(2)
        return ""

    return _DSN_PARAMETER.sub(take, arg), found


def _xtext(name: str, value: str, limit: int) -> str:
    if not value or len(value) > limit or not _XTEXT.match(value):
        raise ParameterError(f"501 5.5.4 Invalid {name} parameter (RFC 3461 xtext)")
    return value


def mail_parameters(found: dict[str, str]) -> tuple[str, str]:
    """(ret, envid) from MAIL FROM's DSN parameters; NOTIFY/ORCPT belong to RCPT."""
    if {"NOTIFY", "ORCPT"} & found.keys():
        raise ParameterError("555 5.5.4 NOTIFY and ORCPT are RCPT TO parameters")
    ret = found.get("RET", "").upper()
    if "RET" in found and ret not in ("FULL", "HDRS"):
        raise ParameterError("501 5.5.4 RET must be FULL or HDRS")
    envid = _xtext("ENVID", found["ENVID"], MAX_ENVID) if "ENVID" in found else ""
    return ret, envid


def rcpt_parameters(found: dict[str, str]) -> RecipientOptions:
    if {"RET", "ENVID"} & found.keys():
        raise ParameterError("555 5.5.4 RET and ENVID are MAIL FROM parameters")
    notify: tuple[str, ...] = ()
    if "NOTIFY" in found:
        kinds = tuple(kind.upper() for kind in found["NOTIFY"].split(","))
        if kinds != ("NEVER",) and not (kinds and set(kinds) <= NOTIFY_KINDS):
            raise ParameterError(
                "501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
            )
        notify = kinds
    orcpt = ""
    if "ORCPT" in found:
        kind, sep, address = found["ORCPT"].partition(";")
        if not sep or not re.fullmatch(r"[A-Za-z0-9-]{1,20}", kind):
            raise ParameterError("501 5.5.4 ORCPT must be addr-type;xtext")
        orcpt = f"{kind};{_xtext('ORCPT', address, MAX_ORCPT)}"
    return RecipientOptions(notify=notify, orcpt=orcpt)


def decode_xtext(value: str) -> str:
    """``+XX`` hex escapes back to characters (for reports)."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
