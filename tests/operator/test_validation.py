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
    pytest.param(
        {"allowedNetworks": ["10.0.0.0/8", "not-a-network"]},
        'spec.allowedNetworks[1]: Invalid value: "not-a-network": each allowedNetworks entry '
        "must be a CIDR",
        id="allowedNetworks-not-a-cidr",
    ),
]

NAME_REFUSED = "metadata.name must be a DNS-1035 label"

# (spec at creation, spec changed to, what the refusal names)
STORAGE_CHANGES = [
    pytest.param(
        {"storage": {"storageClassName": "fast"}},
        {"storage": {"storageClassName": "slow"}},
        "spec.storage.storageClassName: Forbidden: storage.storageClassName cannot be added, "
        "removed or changed",
        id="class-changed",
    ),
    pytest.param(
        {},
        {"storage": {"storageClassName": "fast"}},
        "spec.storage.storageClassName: Forbidden",
        id="class-added",
    ),
    pytest.param(
        {"storage": {"storageClassName": "fast"}},
        {"storage": {}},
        "spec.storage.storageClassName: Forbidden",
        id="class-removed",
    ),
    pytest.param(
        {"storage": {"size": "2Gi"}},
        {"storage": {"size": "1536Mi"}},
        "spec.storage.size: Forbidden: storage.size cannot shrink",
        id="size-shrunk",
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

    @pytest.mark.parametrize(
        "name", ["1mail", "mail.example", "m" * 53], ids=["digit-first", "dot", "too-long"]
    )
    def test_name_that_cannot_name_a_service_is_refused(self, cluster: Cluster, name: str) -> None:
        """A name the relay's Service (and suffixed children) could not carry is refused."""
        result = cluster.apply(relay_manifest(name, {}))
        assert result.returncode != 0
        assert NAME_REFUSED in result.stderr
        assert cluster.get("smtprelay", name) is None

    def test_longest_allowed_name_is_accepted(self, cluster: Cluster) -> None:
        """52 characters starting with a letter pass."""
        result = cluster.apply(relay_manifest("m" * 52, {}))
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize(("before", "after", "message"), STORAGE_CHANGES)
    def test_storage_change_a_claim_cannot_take_is_refused(
        self, cluster: Cluster, before: dict[str, Any], after: dict[str, Any], message: str
    ) -> None:
        """The spool's class is fixed and its size only grows: refused at the API server."""
        created = cluster.apply(relay_manifest("mail", before))
        assert created.returncode == 0, created.stderr
        result = cluster.replace(relay_manifest("mail", after))
        assert result.returncode != 0
        assert message in result.stderr
        assert cluster.must_get("smtprelay", "mail")["spec"]["storage"] == {
            "retainOnDelete": True,
            "size": "1Gi",
            **before.get("storage", {}),
        }

    def test_storage_may_grow(self, cluster: Cluster) -> None:
        """Growing the spool (1Gi → 2Gi) is accepted; the claim may expand."""
        assert cluster.apply(relay_manifest("mail", {"storage": {"size": "1Gi"}})).returncode == 0
        result = cluster.replace(relay_manifest("mail", {"storage": {"size": "2Gi"}}))
        assert result.returncode == 0, result.stderr

    def test_unknown_field_is_refused(self, cluster: Cluster) -> None:
        """A misspelt field is an error, not silently dropped (kubectl's strict validation)."""
        result = cluster.apply(relay_manifest("bad", {"delivery": {"queuetimer": "1m"}}))
        assert result.returncode != 0
        assert "queuetimer" in result.stderr

    def test_spec_the_relay_refuses_is_reported_degraded(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A spec the schema allows but the relay rejects: Degraded and Stalled True with
        reason InvalidConfig, naming the field; nothing is applied."""
        create_relay(cluster, "mail", {"dnsServers": ["192.0.2.53:99999"]})

        def degraded() -> bool:
            relay = cluster.must_get("smtprelay", "mail")
            found = condition(relay, "Degraded")
            return found.get("status") == "True" and found.get("reason") == "InvalidConfig"

        wait_for(degraded, timeout=CONVERGE, what="Degraded InvalidConfig")
        relay = cluster.must_get("smtprelay", "mail")
        assert "dnsServers[0]" in condition(relay, "Degraded")["message"]
        assert condition(relay, "Stalled")["status"] == "True"
        assert condition(relay, "Ready")["status"] == "False"
        assert relay["status"]["observedGeneration"] == relay["metadata"]["generation"]
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
