"""Where a recipient's mail goes on a given attempt: by a rule of ``routes``, direct to its
MX, or to the gateway (Postfix's transport_maps, sender_dependent_relayhost_maps, relayhost).

The decision (`choose_route`) is pure; `MxResolver` does the DNS part (RFC 5321 §5.1: MX,
else the domain's own A/AAAA; RFC 7505 null MX and NXDOMAIN fail at once).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from smtprelay.config import MailSettings, TlsLevel, split_hostport
from smtprelay.config import Route as RouteRule

RESOLV_CONF_ENV = "SMTPRELAY_RESOLV_CONF"


@dataclass(frozen=True)
class Route:
    """One way out for a group of recipients, with the TLS policy that goes with it.

    ``direct``: ``name`` is the recipient domain, looked up in DNS (MX). ``gateway`` and
    ``route`` (a rule of ``routes`` with ``via``): ``hosts`` are tried in order within one
    attempt; ``name`` and ``port`` are the first of them.
    """

    kind: Literal["direct", "gateway", "route"]
    name: str
    port: int
    hosts: tuple[str, ...] = ()
    tls: TlsLevel = "may"
    implicit_tls: bool = False
    ca_file: Path | None = None
    credentials_file: Path | None = None


@dataclass(frozen=True)
class Resolved:
    """Addresses to try, best first; ``names[i]`` is the host name ``addresses[i]`` belongs
    to (its MX, or the domain itself), the name a TLS certificate is checked against."""

    addresses: tuple[str, ...]
    mx: tuple[str, ...]
    names: tuple[str, ...] = ()

    def targets(self) -> tuple[tuple[str, str], ...]:
        """(host name, address) pairs in order."""
        names = self.names or tuple("" for _ in self.addresses)
        return tuple(zip(names, self.addresses, strict=True))


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
    if not gateway.targets:
        return False
    return gateway.send_all or attempt > gateway.tries_before_gateway


def domain_matches(domain: str, patterns: list[str]) -> bool:
    """``example.org`` matches itself; ``.example.org`` also every name below it."""
    for pattern in map(str.lower, patterns):
        if domain == pattern.lstrip("."):
            return True
        if pattern.startswith(".") and domain.endswith(pattern):
            return True
    return False


def matching_rule(
    settings: MailSettings, sender: str, recipient: str
) -> tuple[int, RouteRule] | None:
    """The first rule of ``routes`` for this recipient (and sender), with its index."""
    domain = domain_of(recipient)
    sender_domain = domain_of(sender) if sender else ""
    for index, rule in enumerate(settings.routes):
        if not domain_matches(domain, rule.domains):
            continue
        if rule.senders is not None and not domain_matches(sender_domain, rule.senders):
            continue
        return index, rule
    return None


def _relay_hops(
    kind: Literal["gateway", "route"],
    hosts: list[str],
    *,
    tls: TlsLevel,
    implicit_tls: bool,
    ca_file: Path | None,
    credentials_file: Path | None,
) -> Route:
    first, port = split_hostport(hosts[0], 25)
    return Route(
        kind=kind,
        name=first,
        port=port,
        hosts=tuple(hosts),
        tls=tls,
        implicit_tls=implicit_tls,
        ca_file=ca_file,
        credentials_file=credentials_file,
    )


def choose_route(settings: MailSettings, recipient: str, attempt: int, sender: str = "") -> Route:
    """Where ``recipient``'s mail goes on ``attempt``: the first matching rule of
    ``routes``, else direct for the first triesBeforeGateway attempts, then the gateway."""
    found = matching_rule(settings, sender, recipient)
    if found is not None:
        _, rule = found
        if rule.via is not None:
            return _relay_hops(
                "route",
                rule.via,
                tls=rule.tls_level or "may",
                implicit_tls=rule.implicit_tls,
                ca_file=rule.ca_file,
                credentials_file=rule.credentials_file,
            )
        return Route(
            kind="direct",
            name=domain_of(recipient),
            port=settings.delivery.port,
            tls=rule.tls or settings.delivery.tls,
            ca_file=rule.ca_file,
        )
    if uses_gateway(settings, attempt):
        gateway = settings.gateway
        return _relay_hops(
            "gateway",
            gateway.targets,
            tls=gateway.tls_level,
            implicit_tls=gateway.implicit_tls,
            ca_file=gateway.ca_file,
            credentials_file=gateway.credentials_file,
        )
    return Route(
        kind="direct",
        name=domain_of(recipient),
        port=settings.delivery.port,
        tls=settings.delivery.tls,
    )


def group_by_route(
    settings: MailSettings, recipients: tuple[str, ...], attempt: int, sender: str = ""
) -> dict[Route, tuple[str, ...]]:
    """One connection per destination carries all of its recipients."""
    groups: dict[Route, list[str]] = {}
    for recipient in recipients:
        route = choose_route(settings, recipient, attempt, sender)
        groups.setdefault(route, []).append(recipient)
    return {route: tuple(members) for route, members in groups.items()}


@functools.lru_cache(maxsize=1024)
def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class MxResolver:
    """MX and address lookups against the configured DNS servers (or the system's)."""

    def __init__(
        self, servers: list[str], *, timeout: float = 5.0, resolv_conf: Path | None = None
    ) -> None:
        """``servers`` empty: the pod's resolver. Either way the search list and ndots come
        from ``resolv_conf`` (the pod's /etc/resolv.conf unless ``SMTPRELAY_RESOLV_CONF``
        names another), so a gateway given as a Service's short name resolves as in the pod."""
        path = resolv_conf or Path(os.environ.get(RESOLV_CONF_ENV, "/etc/resolv.conf"))
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        with contextlib.suppress(OSError, dns.resolver.NoResolverConfiguration):
            self._resolver.read_resolv_conf(str(path))
        if servers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*split_hostport(server, 53)) for server in servers
            ]
        self._resolver.lifetime = timeout

    async def addresses(
        self, host: str, *, search: bool = False
    ) -> tuple[str, ...] | ResolveFailure:
        """A then AAAA records of one host; ``search``: a relative name (a configured
        gateway such as ``smarthost.mail``) goes through the resolver's search list."""
        if _is_ip(host.strip("[]")):
            return (host.strip("[]"),)
        found: list[str] = []
        temporary: str | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._lookup(host, rdtype, search=search)
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

    async def _lookup(self, host: str, rdtype: str, *, search: bool) -> dns.resolver.Answer:
        try:
            return await self._resolver.resolve(host, rdtype, search=search)
        except (dns.resolver.NoNameservers, dns.exception.Timeout):
            if not search:
                raise
            # A search candidate the server will not answer (REFUSED, SERVFAIL) ends
            # dnspython's walk of the list; the name as written still gets its own lookup.
            return await self._resolver.resolve(host, rdtype, search=False)

    async def resolve(self, domain: str) -> Resolved | ResolveFailure:
        """The addresses to deliver a domain's mail to, MX preference order."""
        if _is_ip(domain.strip("[]")):
            literal = domain.strip("[]")
            return Resolved(addresses=(literal,), mx=(), names=(literal,))
        try:
            answer = await self._resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            return ResolveFailure(True, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
        except dns.resolver.NoAnswer:
            implicit = await self.addresses(domain)
            if isinstance(implicit, ResolveFailure):
                return implicit
            return Resolved(addresses=implicit, mx=(), names=(domain,) * len(implicit))
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as error:
            return ResolveFailure(False, "4.4.3", f"MX lookup of {domain} failed: {error}")
        records = sorted(answer, key=lambda record: record.preference)
        exchanges = [record.exchange.to_text(omit_final_dot=True) for record in records]
        if len(exchanges) == 1 and exchanges[0] in ("", "."):
            return ResolveFailure(True, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        addresses: list[str] = []
        names: list[str] = []
        failure: ResolveFailure | None = None
        for exchange in exchanges:
            if exchange in ("", "."):
                continue
            result = await self.addresses(exchange)
            if isinstance(result, ResolveFailure):
                failure = failure or result
                continue
            for address in result:
                if address not in addresses:
                    addresses.append(address)
                    names.append(exchange)
        if addresses:
            return Resolved(addresses=tuple(addresses), mx=tuple(exchanges), names=tuple(names))
        assert failure is not None
        # An MX that points nowhere may be fixed by its owner: defer rather than bounce.
        return ResolveFailure(False, "4.4.3", failure.reason)
