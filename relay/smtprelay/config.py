"""The one model of the relay's settings.

The relay validates ``relay.yaml`` with it and the operator derives the SmtpRelay CRD schema
from it, so a field means the same thing in both places and the two cannot drift. It imports
nothing else of the project.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
OPTIONAL_DURATION_PATTERN = rf"^0$|{DURATION_PATTERN}"
QUANTITY_PATTERN = r"^[0-9]+(Ki|Mi|Gi|k|K|M|G)?$"
HOSTPORT_PATTERN = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?$"
DOMAIN_PATTERN = r"^\.?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
IP_OR_IPPORT_PATTERN = r"^(\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?|[0-9a-fA-F:.]+)$"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY_UNITS = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from ``90s``, ``30m``, ``1h30m``; a bare number is taken as seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be positive")
        return float(value)
    if not isinstance(value, str) or not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration like 90s, 30m or 1h")
    seconds = sum(
        int(n) * _DURATION_UNITS[unit] for n, unit in re.findall(r"([0-9]+)(ms|s|m|h)", value)
    )
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


def parse_quantity(value: object) -> int:
    """Bytes from a Kubernetes-style quantity (``25Mi``, ``10M``) or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    match = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|k|K|M|G)?", str(value))
    if not isinstance(value, str) or match is None:
        raise ValueError(f"{value!r} is not a size like 25Mi or 10M")
    size = int(match.group(1)) * _QUANTITY_UNITS[match.group(2) or ""]
    if size <= 0:
        raise ValueError("must be positive")
    return size


def split_hostport(value: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address → (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    if value.count(":") > 1:  # a bare IPv6 address carries no port
        return value, default_port
    host, sep, port_text = value.partition(":")
    return host, int(port_text) if sep else default_port


def parse_optional_duration(value: object) -> float:
    """A duration, or 0 / ``"0"`` for off."""
    if value in (0, "0", 0.0) and not isinstance(value, bool):
        return 0.0
    return parse_duration(value)


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")


def _hostport(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(HOSTPORT_PATTERN, value):
        raise ValueError(f"{value!r} is not host or host:port")
    _check_port(split_hostport(value, 1)[1])
    return value


def _ip_or_ipport(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address or ip:port")
    host, port = split_hostport(value, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or ip:port") from None
    _check_port(port)
    return value


def _network(value: object) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR like 10.0.0.0/8") from None


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN}),
]
OptionalDuration = Annotated[
    float,
    BeforeValidator(parse_optional_duration),
    WithJsonSchema({"type": "string", "pattern": OPTIONAL_DURATION_PATTERN}),
]
Quantity = Annotated[
    int,
    BeforeValidator(parse_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
        }
    ),
]
HostPort = Annotated[
    str,
    BeforeValidator(_hostport),
    WithJsonSchema({"type": "string", "pattern": HOSTPORT_PATTERN}),
]
DnsServer = Annotated[
    str,
    BeforeValidator(_ip_or_ipport),
    WithJsonSchema({"type": "string", "pattern": IP_OR_IPPORT_PATTERN}),
]
Network = Annotated[
    str,
    BeforeValidator(_network),
    WithJsonSchema({"type": "string", "description": "a CIDR, e.g. 10.0.0.0/8 or fc00::/7"}),
]
Port = Annotated[int, Field(ge=1, le=65535)]

# Pod and node networks. Not loopback: a sidecar proxy (Istio, Linkerd) hands the relay
# every connection from 127.0.0.x, and counting those would open the relay to whoever can
# reach the sidecar.
DEFAULT_NETWORKS = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
]


TLS_LEVELS = ("none", "may", "encrypt", "verify")
TlsLevel = Annotated[
    Literal["none", "may", "encrypt", "verify"],
    # maxLength keeps CEL's cost estimate of rules comparing it small.
    WithJsonSchema({"type": "string", "enum": list(TLS_LEVELS), "maxLength": 7}),
]
TLS_LEVELS_TEXT = (
    "none: plaintext; may: STARTTLS when offered, unverified, plaintext after a failed "
    "handshake; encrypt: TLS required, unverified; verify: TLS required, certificate chain "
    "and host name checked (SNI sent)."
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_secret_channel(where: str, tls: TlsLevel | None, credentials: Path | None) -> None:
    """AUTH goes only over a verified channel, or an encrypted one the user chose knowingly."""
    if credentials is not None and tls in ("none", "may"):
        raise ValueError(
            f"{where}.tls {tls} would send the credentialsFile password over an unverified "
            "or plaintext channel; use verify (or encrypt to skip certificate checks)"
        )


class Delivery(_Model):
    """How and how often the relay tries to deliver."""

    tries: int = Field(
        20,
        ge=1,
        description="Tries before returning to sender: total delivery attempts, direct and "
        "gateway together; after the last one the sender gets a bounce.",
    )
    queue_timer: Duration = Field(
        1800.0,
        alias="queueTimer",
        description="Queue Timer: how long a deferred message waits before its next attempt "
        "(90s, 30m, 1h).",
    )
    port: Port = Field(25, description="TCP port for direct (MX) delivery.")
    delay_warning: OptionalDuration = Field(
        0.0,
        alias="delayWarning",
        description="After this long in the queue the sender is told once that the message "
        "is still being retried (RFC 3464 Action: delayed); 0: never.",
    )
    tls: TlsLevel = Field(
        "may",
        description="TLS policy for direct (MX) delivery (RFC 7435 levels). " + TLS_LEVELS_TEXT,
    )
    concurrency: int = Field(20, ge=1, le=1000, description="Delivery attempts in flight at once.")


class Gateway(_Model):
    """A remote mail gateway (or an ordered list of them), as fallback or for all mail."""

    host: HostPort | None = Field(
        None,
        description="Remote Mail Gateway Host: host or host:port (port 25 by default); "
        "the same as a one-entry hosts.",
    )
    hosts: list[HostPort] | None = Field(
        None,
        min_length=1,
        description="Gateways in order of preference (host or host:port each); within one "
        "attempt the next is tried when one is unreachable or answers 4xx. Not with host.",
    )
    send_all: bool = Field(
        False,
        alias="sendAll",
        description="Send all remote mail through the gateway; requires host or hosts.",
    )
    tries_before_gateway: int = Field(
        3,
        ge=0,
        alias="triesBeforeGateway",
        description="Direct attempts before the gateway takes over; requires host or hosts "
        "and must be less than delivery.tries.",
    )
    tls: TlsLevel | None = Field(
        None,
        description="TLS policy at the gateway; unset: verify when credentials are set, "
        "else may. " + TLS_LEVELS_TEXT,
    )
    implicit_tls: bool = Field(
        False,
        alias="implicitTls",
        description="TLS from the first byte (port 465, RFC 8314) instead of STARTTLS.",
    )
    ca_file: Path | None = Field(
        None,
        alias="caFile",
        description="PEM CA bundle the gateway's certificate must chain to under verify; "
        "unset: the system CAs.",
    )
    credentials_file: Path | None = Field(
        None,
        alias="credentialsFile",
        description="File with 'username' and 'password' lines (YAML) for AUTH at the gateway.",
    )

    @property
    def targets(self) -> list[str]:
        """The gateways in order: ``hosts``, or ``host`` as a list of one."""
        if self.hosts is not None:
            return list(self.hosts)
        return [self.host] if self.host is not None else []

    @property
    def tls_level(self) -> TlsLevel:
        if self.tls is not None:
            return self.tls
        return "verify" if self.credentials_file is not None else "may"

    @model_validator(mode="after")
    def _needs_host(self) -> Gateway:
        if self.host is not None and self.hosts is not None:
            raise ValueError("gateway.host and gateway.hosts are both set; use one of them")
        if not self.targets:
            for name, field in (
                ("sendAll", "send_all"),
                ("triesBeforeGateway", "tries_before_gateway"),
            ):
                if field in self.model_fields_set and (field != "send_all" or self.send_all):
                    raise ValueError(f"{name} requires gateway.host")
        _check_secret_channel("gateway", self.tls, self.credentials_file)
        return self


class Limits(_Model):
    """What clients may take of the relay: sessions, errors and time, as Postfix bounds them."""

    sessions: int = Field(
        1000, ge=1, description="Concurrent SMTP sessions; beyond this a client gets 421."
    )
    sessions_per_client: int = Field(
        100,
        ge=1,
        alias="sessionsPerClient",
        description="Concurrent SMTP sessions from one client address; beyond: 421.",
    )
    errors_per_session: int = Field(
        20,
        ge=1,
        alias="errorsPerSession",
        description="Refused commands after which the client gets 421 and is disconnected.",
    )
    command_timeout: Duration = Field(
        300.0,
        alias="commandTimeout",
        description="Time allowed for the client's next complete command; no partial line "
        "resets it.",
    )
    data_timeout: Duration = Field(
        600.0,
        alias="dataTimeout",
        description="Time allowed for the whole message after DATA's 354; a slow sender "
        "cannot stretch it.",
    )


class Route(_Model):
    """One rule of ``routes``: mail for these domains (and senders) goes this way."""

    domains: list[Annotated[str, Field(pattern=DOMAIN_PATTERN)]] = Field(
        min_length=1,
        description="Recipient domains; a leading dot (.example.org) also matches every subdomain.",
    )
    senders: list[Annotated[str, Field(pattern=DOMAIN_PATTERN)]] | None = Field(
        None,
        min_length=1,
        description="Only mail from these sender domains (leading dot: subdomains too); "
        "unset: any sender.",
    )
    via: list[HostPort] | None = Field(
        None,
        min_length=1,
        description="Hosts (host or host:port, port 25) tried in order like gateway.hosts.",
    )
    direct: bool = Field(False, description="Deliver directly (MX) instead of via hosts.")
    tls: TlsLevel | None = Field(
        None,
        description="TLS policy for this route; unset: verify with credentials, else may "
        "(via), delivery.tls (direct).",
    )
    implicit_tls: bool = Field(
        False, alias="implicitTls", description="TLS from the first byte (port 465)."
    )
    ca_file: Path | None = Field(
        None, alias="caFile", description="PEM CA bundle for verify; unset: the system CAs."
    )
    credentials_file: Path | None = Field(
        None,
        alias="credentialsFile",
        description="File with 'username' and 'password' (YAML, or a directory of two files) "
        "for AUTH at the route's hosts.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> Route:
        if (self.via is None) == (not self.direct):
            raise ValueError("a route needs exactly one of via (a list of hosts) or direct: true")
        if self.direct and self.credentials_file is not None:
            raise ValueError("credentialsFile needs via; direct delivery does not authenticate")
        _check_secret_channel("route", self.tls, self.credentials_file)
        return self

    @property
    def tls_level(self) -> TlsLevel | None:
        """The explicit or credential-implied level; None: the default of its kind."""
        if self.tls is not None:
            return self.tls
        return "verify" if self.credentials_file is not None else None


class Logging(_Model):
    """Where mail events are logged (the original Log To / Debug Messages options)."""

    target: Literal["file", "stdout", "syslog", "none"] = Field(
        "file",
        description="file: <spoolDir>/sysMMDD.txt, one a day; stdout: the container log; "
        "syslog: RFC 5424 to syslogServer; none: no mail events.",
    )
    syslog_server: HostPort | None = Field(
        None,
        alias="syslogServer",
        description="Log server: host or host:port (514); required when target is syslog.",
    )
    syslog_protocol: Literal["udp", "tcp"] = Field(
        "udp", alias="syslogProtocol", description="Transport to the log server."
    )
    debug: bool = Field(False, description="Add SMTP session transcripts, both directions.")
    retention_days: int = Field(
        31, ge=1, alias="retentionDays", description="Day files older than this are pruned."
    )

    @model_validator(mode="after")
    def _syslog_needs_server(self) -> Logging:
        if self.target == "syslog" and self.syslog_server is None:
            raise ValueError("target syslog requires logging.syslogServer")
        return self


class ProxyProtocol(_Model):
    """PROXY protocol (v1 and v2) from TCP load balancers that hide the client's address."""

    trusted_networks: list[Network] = Field(
        default_factory=list,
        alias="trustedNetworks",
        description="CIDRs of load balancers whose connections must start with a PROXY v1/v2 "
        "header naming the real client, which allowedNetworks then judges; from any other "
        "address a PROXY header is refused. Empty: PROXY is not accepted.",
    )


class TlsFiles(_Model):
    """The certificate STARTTLS offers; re-read when the files change."""

    cert_file: Path = Field(alias="certFile", description="PEM certificate chain.")
    key_file: Path = Field(alias="keyFile", description="PEM private key.")


class AuthFiles(_Model):
    """SMTP AUTH users; offered only under TLS."""

    users_file: Path = Field(
        alias="usersFile", description="YAML map of user name to password hash."
    )


class MailSettings(_Model):
    """What the relay does with mail: shared by relay.yaml and the SmtpRelay spec."""

    hostname: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$",
        description="EHLO name and the domain of bounce From: addresses.",
    )
    allowed_networks: list[Network] = Field(
        default_factory=lambda: list(DEFAULT_NETWORKS),
        alias="allowedNetworks",
        description="CIDRs that may relay without AUTH; all others get 554 5.7.1. The "
        "default (private networks, not loopback) keeps a relay behind a sidecar proxy closed.",
    )
    max_message_size: Quantity = Field(
        25 * 1024**2,
        alias="maxMessageSize",
        description="Largest message accepted (quantity, e.g. 25Mi); advertised in EHLO SIZE.",
    )
    default_mail_host: str | None = Field(
        None,
        alias="defaultMailHost",
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$",
        description="Default Mail Host: a bare user id is sent to user@<this host>; unset, "
        "such recipients get 550 5.1.3.",
    )
    dns_servers: list[DnsServer] = Field(
        default_factory=list,
        alias="dnsServers",
        description="Domain Name Servers (ip or ip:port) for MX/A/AAAA lookups; unset uses "
        "the pod resolver.",
    )
    delivery: Delivery = Field(default_factory=Delivery)
    gateway: Gateway = Field(default_factory=Gateway)
    routes: list[Route] = Field(
        default_factory=list,
        max_length=100,
        description="Rules tried in order before the default direct/gateway choice; the "
        "first whose domains (and senders) match a recipient decides its way.",
    )
    logging: Logging = Field(default_factory=Logging)
    limits: Limits = Field(default_factory=Limits)
    proxy_protocol: ProxyProtocol = Field(default_factory=ProxyProtocol, alias="proxyProtocol")
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Worker processes sharing the SMTP listener and the spool, each owning "
        "the messages it accepted; 0: one per CPU the pod may use.",
    )

    @model_validator(mode="after")
    def _gateway_before_tries(self) -> MailSettings:
        gateway = self.gateway
        if (
            gateway.targets
            and not gateway.send_all
            and gateway.tries_before_gateway >= self.delivery.tries
        ):
            raise ValueError("gateway.triesBeforeGateway must be less than delivery.tries")
        return self


class RelayConfig(MailSettings):
    """The whole of relay.yaml: the mail settings plus where the process listens and stores."""

    listen: HostPort = Field("0.0.0.0:2525", description="SMTP listen address.")
    spool_dir: Path = Field(
        Path("/var/spool/smtprelay"), alias="spoolDir", description="The durable queue."
    )
    metrics_listen: HostPort = Field(
        "0.0.0.0:9090",
        alias="metricsListen",
        description="Prometheus /metrics, /healthz and /readyz.",
    )
    tls: TlsFiles | None = None
    auth: AuthFiles | None = None


# What a running relay cannot take from a new relay.yaml: sockets, the spool, the process
# count and the mounted TLS/AUTH files. Everything else (the mail settings) changes live;
# the operator rolls the pod only when one of these changes.
RESTART_ONLY_FIELDS = ("listen", "spool_dir", "metrics_listen", "workers", "tls", "auth")


class ConfigError(Exception):
    """relay.yaml is unusable; ``problems`` holds one line per problem, naming the field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith(("function-", "union[")):
            path += f".{part}" if path else part
    return path or "(top level)"


def problems_of(error: ValidationError) -> list[str]:
    """One line per problem, each starting with the dotted field name."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{_field_path(item['loc'])}: {message}")
    return lines


def parse_config(data: Any) -> RelayConfig:
    """Validate a loaded relay.yaml document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of settings"])
    try:
        return RelayConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(problems_of(error)) from None


def load_config(path: Path) -> RelayConfig:
    """Read and validate relay.yaml; every problem is reported, not only the first."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: {error.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {error}"]) from None
    return parse_config(data)
