"""Where a recipient's mail goes on a given attempt: direct to its MX, or to the gateway.

The decision (`choose_route`) is pure; `MxResolver` does the DNS part (RFC 5321 §5.1: MX,
else the domain's own A/AAAA; RFC 7505 null MX and NXDOMAIN fail at once).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from smtprelay.config import MailSettings, split_hostport


@dataclass(frozen=True)
class Route:
    """One destination for a group of recipients: ``hosts`` tried in order."""

    kind: Literal["direct", "gateway"]
    name: str  # the recipient domain (direct) or the gateway host (gateway)
    port: int


@dataclass(frozen=True)
class Resolved:
    """Addresses to try, best first."""

    addresses: tuple[str, ...]
    mx: tuple[str, ...]


@dataclass(frozen=True)
class ResolveFailure:
    """A lookup that did not give addresses; ``permanent`` failures bounce at once."""

    permanent: bool
    status: str  # RFC 3463 enhanced status code
    reason: str


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def uses_gateway(settings: MailSettings, attempt: int) -> bool:
    """Attempts 1..triesBeforeGateway go direct, later ones (all, with sendAll) to the gateway."""
    gateway = settings.gateway
    if gateway.host is None:
        return False
    return gateway.send_all or attempt > gateway.tries_before_gateway


def choose_route(settings: MailSettings, recipient: str, attempt: int) -> Route:
    if uses_gateway(settings, attempt):
        assert settings.gateway.host is not None
        host, port = split_hostport(settings.gateway.host, 25)
        return Route(kind="gateway", name=host, port=port)
    return Route(kind="direct", name=domain_of(recipient), port=settings.delivery.port)


def group_by_route(
    settings: MailSettings, recipients: tuple[str, ...], attempt: int
) -> dict[Route, tuple[str, ...]]:
    """One connection per destination carries all of its recipients."""
    groups: dict[Route, list[str]] = {}
    for recipient in recipients:
        groups.setdefault(choose_route(settings, recipient, attempt), []).append(recipient)
    return {route: tuple(members) for route, members in groups.items()}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class MxResolver:
    """MX and address lookups against the configured DNS servers (or the system's)."""

    def __init__(self, servers: list[str], *, timeout: float = 5.0) -> None:
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*split_hostport(server, 53)) for server in servers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout

    async def addresses(self, host: str) -> tuple[str, ...] | ResolveFailure:
        """A then AAAA records of one host."""
        if _is_ip(host.strip("[]")):
            return (host.strip("[]"),)
        found: list[str] = []
        temporary: str | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype, search=False)
            except dns.resolver.NXDOMAIN:
                return ResolveFailure(True, "5.1.2", f"host {host} does not exist (NXDOMAIN)")
            except dns.resolver.NoAnswer:
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as error:
                temporary = f"lookup of {host} {rdtype} failed: {error}"
                continue
            found.extend(record.address for record in answer)
        if found:
            return tuple(found)
        if temporary is not None:
            return ResolveFailure(False, "4.4.3", temporary)
        return ResolveFailure(True, "5.1.2", f"host {host} has no A or AAAA record")

    async def resolve(self, domain: str) -> Resolved | ResolveFailure:
        """The addresses to deliver a domain's mail to, MX preference order."""
        if _is_ip(domain.strip("[]")):
            return Resolved(addresses=(domain.strip("[]"),), mx=())
        try:
            answer = await self._resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            return ResolveFailure(True, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
        except dns.resolver.NoAnswer:
            implicit = await self.addresses(domain)
            if isinstance(implicit, ResolveFailure):
                return implicit
            return Resolved(addresses=implicit, mx=())
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as error:
            return ResolveFailure(False, "4.4.3", f"MX lookup of {domain} failed: {error}")
        records = sorted(answer, key=lambda record: record.preference)
        exchanges = [record.exchange.to_text(omit_final_dot=True) for record in records]
        if len(exchanges) == 1 and exchanges[0] in ("", "."):
            return ResolveFailure(True, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        addresses: list[str] = []
        failure: ResolveFailure | None = None
        for exchange in exchanges:
            if exchange in ("", "."):
                continue
            result = await self.addresses(exchange)
            if isinstance(result, ResolveFailure):
                failure = failure or result
                continue
            addresses.extend(a for a in result if a not in addresses)
        if addresses:
            return Resolved(addresses=tuple(addresses), mx=tuple(exchanges))
        assert failure is not None
        # An MX that points nowhere may be fixed by its owner: defer rather than bounce.
        return ResolveFailure(False, "4.4.3", failure.reason)
