"""RFC 5321 syntax for what a client names at the front door: EHLO names and addresses.

Pure functions that return ``None`` for a good value or a short reason naming the problem,
so the front door can refuse at the command with a 5xx that says what is wrong. Whatever
passes can go into a ``Received:`` header, a delivery command or a report unquoted: no
control characters, no white space, no header or command syntax, RFC 5321 §4.5.3.1 lengths.
"""

from __future__ import annotations

import ipaddress
import re

LOCAL_PART_MAX = 64  # RFC 5321 §4.5.3.1.1
DOMAIN_MAX = 255  # §4.5.3.1.2
LABEL_MAX = 63  # RFC 1035 §2.3.4
PATH_MAX = 256  # §4.5.3.1.3, angle brackets included

# C0 controls, DEL, C1 controls, and the surrogates aiosmtpd uses for undecodable bytes.
_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f\ud800-\udfff]")
# Non-ASCII characters RFC 6531 allows (SMTPUTF8): no C1 controls, no lone surrogates.
_UTF8 = "\u00a0-\ud7ff\ue000-\U0010ffff"
# Dot-atom (RFC 5322 atext).
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]+"
_DOT_ATOM = re.compile(rf"^{_ATOM}(\.{_ATOM})*$")
_QUOTED = re.compile(rf'^"([\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(rf"^[A-Za-z0-9{_UTF8}]([A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?$")
# EHLO names in the wild carry underscores (Windows host names); accept those as Postfix does.
_HELO_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_\-]*[A-Za-z0-9_])?$")


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def literal_problem(literal: str) -> str | None:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3)."""
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return f"{literal} is not an IPv4 or IPv6 address literal"
    return None


def domain_problem(domain: str, *, label: re.Pattern[str] = _LABEL) -> str | None:
    """Why ``domain`` is not a usable domain name or address literal, or None."""
    if not domain:
        return "the domain is empty"
    if _CONTROL.search(domain):
        return "the domain contains a control character or white space"
    if domain.startswith("[") and domain.endswith("]"):
        return literal_problem(domain)
    if _octets(domain) > DOMAIN_MAX:
        return f"the domain is longer than {DOMAIN_MAX} octets"
    for part in domain.split("."):
        if _octets(part) > LABEL_MAX:
            return f"a domain label is longer than {LABEL_MAX} octets"
        if not label.match(part):
            return f"{part!r} is not a valid domain label"
    return None


def local_part_problem(local: str) -> str | None:
    if not local:
        return "the local part is empty"
    if _octets(local) > LOCAL_PART_MAX:
        return f"the local part is longer than {LOCAL_PART_MAX} octets"
    if local.startswith('"'):
        if not _QUOTED.match(local):
            return "the quoted local part contains a forbidden character"
        return None
    if _CONTROL.search(local):
        return "the local part contains a control character or white space"
    if not _DOT_ATOM.match(local):
        return "the local part contains a character not allowed unquoted"
    return None


def address_problem(address: str) -> str | None:
    """Why ``address`` (``local@domain``, no angle brackets) is unusable, or None."""
    if _octets(address) + 2 > PATH_MAX:
        return f"the address is longer than {PATH_MAX - 2} octets"
    local, at, domain = address.rpartition("@")
    if not at:
        return "the address has no domain"
    return local_part_problem(local) or domain_problem(domain)


def helo_problem(name: str) -> str | None:
    """Why an EHLO/HELO argument cannot be recorded in a ``Received:`` header, or None."""
    return domain_problem(name, label=_HELO_LABEL)


def canonical(address: str) -> str:
    """The form two recipients are compared in: the domain is case-insensitive."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"
