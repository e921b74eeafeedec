"""The API server refuses what the relay would, naming the field; the relay's parser backs it up."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.support import (
    CONVERGE,
    Cluster,
    Operator,
    condition,
    create_relay,
    exists,
    relay_manifest,
    wait_for,
)

pytestmark = pytest.mark.cluster


INVALID = [
    pytest.param(
        {"gateway": {"sendAll": True}},
        "spec.gateway.host: Required value: gateway.sendAll requires gateway.host",
        id="sendAll-without-host",
    ),
    pytest.param(
        {"gateway": {"triesBeforeGateway": 2}},
        "spec.gateway.host: Required value: gateway.triesBeforeGateway requires gateway.host",
        id="triesBeforeGateway-without-host",
    ),
    pytest.param(
        {"delivery": {"queueTimer": "soon"}},
        "spec.delivery.queueTimer",
        id="bad-queueTimer",
    ),
    pytest.param(
        {"delivery": {"tries": 3}, "gateway": {"host": "gw.example.com", "triesBeforeGateway": 3}},
        "spec.gateway.triesBeforeGateway: Invalid value: "
        "gateway.triesBeforeGateway must be less than delivery.tries",
        id="triesBeforeGateway-not-below-tries",
    ),
    pytest.param(
        {"logging": {"target": "syslog"}},
        "spec.logging.syslogServer: Required value",
        id="syslog-without-server",
    ),
    pytest.param(
        {"service": {"type": "ExternalName"}},
        "spec.service.type: Unsupported value",
        id="bad-service-type",
    ),
    pytest.param(
        {"delivery": {"tries": 0}},
        "spec.delivery.tries",
        id="tries-below-one",
    ),
    pytest.param(
        {"gateway": {"host": "a.example.com", "hosts": ["b.example.com"]}},
        "spec.gateway.hosts: Invalid value: "
        "gateway.host and gateway.hosts are both set; use one of them",
        id="host-and-hosts",
    ),
    pytest.param(
        {"gateway": {"host": "a.example.com", "tls": "may", "credentialsSecret": "login"}},
        "spec.gateway.tls: Invalid value: gateway.tls none or may would send the "
        "credentialsSecret password unverified",
        id="credentials-over-unverified-tls",
    ),
    pytest.param(
        {"routes": [{"domains": ["a.example"]}]},
        "spec.routes[0]: Invalid value: "
        "a route needs exactly one of via (a list of hosts) or direct: true",
        id="route-without-a-way",
    ),
    pytest.param(
        {"delivery": {"tls": "strict"}},
        "spec.delivery.tls: Unsupported value",
        id="bad-tls-level",
    ),
]


class TestValidation:
    @pytest.mark.parametrize(("spec", "message"), INVALID)
    def test_invalid_manifest_is_refused_naming_the_field(
        self, cluster: Cluster, spec: dict[str, Any], message: str
    ) -> None:
        """The API server refuses what the relay would, and the message names the field."""
        result = cluster.apply(relay_manifest("bad", spec))
        assert result.returncode != 0
        assert message in result.stderr
        assert cluster.get("smtprelay", "bad") is None

    def test_unknown_field_is_refused(self, cluster: Cluster) -> None:
        """A misspelt field is an error, not silently dropped (kubectl's strict validation)."""
        result = cluster.apply(relay_manifest("bad", {"delivery": {"queuetimer": "1m"}}))
        assert result.returncode != 0
        assert "queuetimer" in result.stderr

    def test_spec_the_relay_refuses_is_reported_degraded(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A spec the schema allows but the relay rejects makes Degraded True, InvalidConfig."""
        create_relay(cluster, "mail", {"allowedNetworks": ["not-a-network"]})

        def degraded() -> bool:
            relay = cluster.must_get("smtprelay", "mail")
            found = condition(relay, "Degraded")
            return found.get("status") == "True" and found.get("reason") == "InvalidConfig"

        wait_for(degraded, timeout=CONVERGE, what="Degraded InvalidConfig")
        message = condition(cluster.must_get("smtprelay", "mail"), "Degraded")["message"]
        assert "allowedNetworks" in message
        assert not exists(cluster, "deployment", "mail")


class TestExplain:
    def test_kubectl_explain_reads_the_descriptions(self, cluster: Cluster) -> None:
        """`kubectl explain smtprelay.spec.gateway` shows each field with its description."""
        found: dict[str, str] = {}

        def explained() -> bool:
            found["text"] = cluster.kubectl("explain", "smtprelay.spec.gateway", check=False)
            return "FIELDS" in found["text"]

        wait_for(explained, timeout=CONVERGE, what="the CRD's schema to be published")
        text = " ".join(found["text"].split())
        assert "Remote Mail Gateway Host: host or host:port" in text
        assert (
            "sendAll <boolean> Send all remote mail through the gateway; requires host or hosts."
            in text
        )
        assert "credentialsSecret <string>" in text
        assert "credentialsFile" not in text
