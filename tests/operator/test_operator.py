"""The operator against a real control plane: objects, status, drift, deletion, restarts."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from smtprelay_operator import api

from tests.operator.conftest import Cluster, Operator, relay_manifest, wait_for

pytestmark = pytest.mark.cluster

CONVERGE = 60.0  # seconds for the operator and the controllers to settle
CHILDREN = (
    ("configmap", "{}-config"),
    ("deployment", "{}"),
    ("persistentvolumeclaim", "{}-spool"),
    ("service", "{}"),
)


def condition(relay: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (relay.get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            found: dict[str, Any] = item
            return found
    return {}


def relay_yaml(cluster: Cluster, name: str) -> dict[str, Any]:
    text = cluster.must_get("configmap", f"{name}-config")["data"]["relay.yaml"]
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def template_hash(cluster: Cluster, name: str) -> str:
    deployment = cluster.must_get("deployment", name)
    return str(
        deployment["spec"]["template"]["metadata"]["annotations"][api.CONFIG_HASH_ANNOTATION]
    )


def create_relay(cluster: Cluster, name: str, spec: dict[str, Any] | None = None) -> None:
    cluster.spool_volume(name)
    result = cluster.apply(relay_manifest(name, spec))
    assert result.returncode == 0, result.stderr


def wait_ready(cluster: Cluster, name: str) -> dict[str, Any]:
    cluster.kubectl(
        "wait", "--for=condition=Ready", f"smtprelay/{name}", f"--timeout={CONVERGE:.0f}s"
    )
    return cluster.must_get("smtprelay", name)


def exists(cluster: Cluster, kind: str, name: str) -> bool:
    return cluster.get(kind, name) is not None


class TestCreate:
    def test_objects_appear_owned_and_the_relay_becomes_ready(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """ConfigMap, Deployment, PVC, Service appear; Ready once the pod is; PVC unowned."""
        create_relay(cluster, "mail")
        relay = wait_ready(cluster, "mail")
        uid = relay["metadata"]["uid"]
        for kind, pattern in CHILDREN:
            child = cluster.must_get(kind, pattern.format("mail"))
            owners = child["metadata"].get("ownerReferences") or []
            if kind == "persistentvolumeclaim":
                assert owners == [], "a retained spool must not be garbage-collected"
            else:
                assert [(o["kind"], o["uid"], o["controller"]) for o in owners] == [
                    ("SmtpRelay", uid, True)
                ]
            assert child["metadata"]["labels"][api.MANAGED_BY_LABEL] == "smtprelay-operator"
        status = relay["status"]
        assert status["observedGeneration"] == relay["metadata"]["generation"]
        assert status["configHash"] == template_hash(cluster, "mail")
        assert status["readyReplicas"] == 1
        assert relay_yaml(cluster, "mail")["hostname"] == f"mail.{cluster.namespace}.svc"

    def test_conditions_have_the_standard_shape(self, cluster: Cluster, operator: Operator) -> None:
        """Ready, Progressing, Degraded with status, reason, message, times and generation."""
        create_relay(cluster, "mail")
        relay = wait_ready(cluster, "mail")
        conditions = relay["status"]["conditions"]
        assert [c["type"] for c in conditions] == ["Ready", "Progressing", "Degraded"]
        for item in conditions:
            assert set(item) == {
                "type",
                "status",
                "reason",
                "message",
                "lastTransitionTime",
                "observedGeneration",
            }
            assert item["observedGeneration"] == relay["metadata"]["generation"]
        assert condition(relay, "Progressing")["status"] == "False"
        assert condition(relay, "Degraded")["status"] == "False"

    def test_kopf_leaves_one_annotation_and_the_user_gets_an_event(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """No finalizer, only kopf's last-handled-configuration, and an Applied Event."""
        create_relay(cluster, "mail")
        relay = wait_ready(cluster, "mail")
        assert not relay["metadata"].get("finalizers")
        ours = [key for key in relay["metadata"]["annotations"] if not key.startswith("kubectl.")]
        assert ours == ["kopf.zalando.org/last-handled-configuration"]
        events = json.loads(
            cluster.kubectl("get", "events", "--field-selector", "reason=Applied", "-o", "json")
        )["items"]
        assert [(e["involvedObject"]["kind"], e["source"]["component"]) for e in events] == [
            ("SmtpRelay", "smtprelay-operator")
        ]

    def test_printer_columns(self, cluster: Cluster, operator: Operator) -> None:
        """`kubectl get smtpr` shows Ready, Gateway, Tries and Queue Timer."""
        create_relay(cluster, "mail", {"gateway": {"host": "gw.example.com"}})
        wait_ready(cluster, "mail")
        table = cluster.kubectl("get", "smtpr", "mail").splitlines()
        assert table[0].split() == ["NAME", "READY", "GATEWAY", "TRIES", "QUEUE", "TIMER", "AGE"]
        assert table[1].split()[:5] == ["mail", "True", "gw.example.com", "20", "30m"]


class TestUpdate:
    def test_gateway_change_rewrites_config_and_rolls_the_pod(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A new gateway.host reaches relay.yaml and changes the pod template's config hash."""
        create_relay(cluster, "mail", {"gateway": {"host": "old.example.com"}})
        relay = wait_ready(cluster, "mail")
        before = template_hash(cluster, "mail")
        cluster.patch("smtprelay", "mail", {"spec": {"gateway": {"host": "new.example.com"}}})
        wait_for(
            lambda: relay_yaml(cluster, "mail")["gateway"]["host"] == "new.example.com",
            timeout=CONVERGE,
            what="relay.yaml to carry the new gateway",
        )
        wait_for(
            lambda: template_hash(cluster, "mail") != before,
            timeout=CONVERGE,
            what="the pod template's config hash to change",
        )

        def reported() -> bool:
            current = cluster.must_get("smtprelay", "mail")
            return bool(
                current["status"].get("observedGeneration") == relay["metadata"]["generation"] + 1
            )

        wait_for(reported, timeout=CONVERGE, what="status.observedGeneration to follow")
        relay = wait_ready(cluster, "mail")
        assert relay["status"]["configHash"] == template_hash(cluster, "mail")

    def test_suspend_scales_to_zero_and_back(self, cluster: Cluster, operator: Operator) -> None:
        """suspended: true → 0 replicas, Ready False (Suspended); false → 1 replica, Ready."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        cluster.patch("smtprelay", "mail", {"spec": {"suspended": True}})

        def suspended() -> bool:
            relay = cluster.must_get("smtprelay", "mail")
            deployment = cluster.must_get("deployment", "mail")
            return (
                deployment["spec"]["replicas"] == 0
                and condition(relay, "Ready").get("reason") == "Suspended"
            )

        wait_for(suspended, timeout=CONVERGE, what="the relay to be scaled to 0")
        assert exists(cluster, "persistentvolumeclaim", "mail-spool"), "the queue is kept"
        cluster.patch("smtprelay", "mail", {"spec": {"suspended": False}})
        wait_for(
            lambda: cluster.must_get("deployment", "mail")["spec"]["replicas"] == 1,
            timeout=CONVERGE,
            what="the relay to be scaled back to 1",
        )
        relay = wait_ready(cluster, "mail")
        assert relay["status"]["readyReplicas"] == 1

    def test_unchanged_readiness_keeps_its_transition_time(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A spec change that leaves Ready True moves observedGeneration, not lastTransitionTime."""
        create_relay(cluster, "mail")
        relay = wait_ready(cluster, "mail")
        since = condition(relay, "Ready")["lastTransitionTime"]
        cluster.patch("smtprelay", "mail", {"spec": {"service": {"port": 2525}}})

        def observed() -> bool:
            current = cluster.must_get("smtprelay", "mail")
            return bool(condition(current, "Ready").get("observedGeneration") == 2)

        wait_for(observed, timeout=CONVERGE, what="Ready to be observed at generation 2")
        relay = cluster.must_get("smtprelay", "mail")
        assert condition(relay, "Ready")["status"] == "True"
        assert condition(relay, "Ready")["lastTransitionTime"] == since
        assert cluster.must_get("service", "mail")["spec"]["ports"][0]["port"] == 2525

    def test_refused_change_is_degraded_and_holds_back_nothing_else(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A PVC resize the cluster refuses → Degraded ApplyFailed; relay.yaml still updates."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        cluster.patch(
            "smtprelay",
            "mail",
            {"spec": {"storage": {"size": "2Gi"}, "gateway": {"host": "gw.example.com"}}},
        )

        def degraded() -> bool:
            found = condition(cluster.must_get("smtprelay", "mail"), "Degraded")
            return found.get("status") == "True" and found.get("reason") == "ApplyFailed"

        wait_for(degraded, timeout=CONVERGE, what="Degraded ApplyFailed")
        message = condition(cluster.must_get("smtprelay", "mail"), "Degraded")["message"]
        assert "PersistentVolumeClaim mail-spool" in message
        assert relay_yaml(cluster, "mail")["gateway"]["host"] == "gw.example.com"
        cluster.patch("smtprelay", "mail", {"spec": {"storage": {"size": "1Gi"}}})

        def recovered() -> bool:
            found = condition(cluster.must_get("smtprelay", "mail"), "Degraded")
            return found.get("status") == "False"

        wait_for(recovered, timeout=CONVERGE, what="Degraded to clear once the spec is fixed")

    def test_retaining_the_spool_later_drops_its_owner_reference(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """retainOnDelete false → true removes the PVC's ownerReference (and back)."""
        create_relay(cluster, "mail", {"storage": {"retainOnDelete": False}})
        wait_ready(cluster, "mail")

        def owners() -> list[Any]:
            claim = cluster.must_get("persistentvolumeclaim", "mail-spool")
            return list(claim["metadata"].get("ownerReferences") or [])

        assert len(owners()) == 1
        cluster.patch("smtprelay", "mail", {"spec": {"storage": {"retainOnDelete": True}}})
        wait_for(lambda: owners() == [], timeout=CONVERGE, what="the ownerReference to go")
        cluster.patch("smtprelay", "mail", {"spec": {"storage": {"retainOnDelete": False}}})
        wait_for(lambda: len(owners()) == 1, timeout=CONVERGE, what="the ownerReference back")


class TestScale:
    def test_twenty_relays_converge_together(self, cluster: Cluster, operator: Operator) -> None:
        """Twenty SmtpRelays applied at once all become Ready, each with its own four objects."""
        names = [f"relay-{index:02d}" for index in range(20)]
        for name in names:
            create_relay(cluster, name)
        for name in names:
            wait_ready(cluster, name)
        for kind in ("configmap", "deployment", "persistentvolumeclaim", "service"):
            selector = f"{api.MANAGED_BY_LABEL}=smtprelay-operator"
            assert len(cluster.list(kind, selector)) == len(names), kind


class TestDrift:
    def test_deleted_deployment_is_recreated(self, cluster: Cluster, operator: Operator) -> None:
        """Deleting the Deployment by hand brings a new one, and the relay back to Ready."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        old_uid = cluster.must_get("deployment", "mail")["metadata"]["uid"]
        cluster.kubectl("delete", "deployment", "mail", "--wait=false")

        def recreated() -> bool:
            deployment = cluster.get("deployment", "mail")
            return deployment is not None and deployment["metadata"]["uid"] != old_uid

        wait_for(recreated, timeout=CONVERGE, what="the Deployment to be recreated")
        wait_ready(cluster, "mail")

    def test_hand_edited_config_map_is_put_back(self, cluster: Cluster, operator: Operator) -> None:
        """Editing relay.yaml by hand is reverted to what the spec says; an Event says so."""
        create_relay(cluster, "mail", {"delivery": {"tries": 7}})
        wait_ready(cluster, "mail")
        rendered = cluster.must_get("configmap", "mail-config")["data"]["relay.yaml"]
        cluster.patch("configmap", "mail-config", {"data": {"relay.yaml": "hostname: hijacked\n"}})
        wait_for(
            lambda: cluster.must_get("configmap", "mail-config")["data"]["relay.yaml"] == rendered,
            timeout=CONVERGE,
            what="relay.yaml to be restored",
        )

        def announced() -> bool:
            events = json.loads(
                cluster.kubectl(
                    "get", "events", "--field-selector", "reason=Restored", "-o", "json"
                )
            )["items"]
            return any("ConfigMap mail-config" in event["message"] for event in events)

        wait_for(announced, timeout=CONVERGE, what="a Restored event on the SmtpRelay")

    def test_deleted_config_map_and_service_are_recreated(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """Deleting the ConfigMap or the Service by hand brings them back."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        cluster.kubectl("delete", "configmap/mail-config", "service/mail")
        wait_for(
            lambda: (
                exists(cluster, "configmap", "mail-config") and exists(cluster, "service", "mail")
            ),
            timeout=CONVERGE,
            what="the ConfigMap and the Service to be recreated",
        )

    def test_scaled_deployment_is_scaled_back(self, cluster: Cluster, operator: Operator) -> None:
        """`kubectl scale` is drift too: replicas return to what the spec says."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        cluster.kubectl("scale", "deployment", "mail", "--replicas=3")
        wait_for(
            lambda: cluster.must_get("deployment", "mail")["spec"]["replicas"] == 1,
            timeout=CONVERGE,
            what="replicas to return to 1",
        )

    def test_fields_of_other_managers_are_left_alone(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A label someone else adds survives the operator's re-apply: it never fights."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        cluster.kubectl("label", "service", "mail", "team=mail-admins")
        cluster.patch("smtprelay", "mail", {"spec": {"service": {"port": 587}}})
        wait_for(
            lambda: cluster.must_get("service", "mail")["spec"]["ports"][0]["port"] == 587,
            timeout=CONVERGE,
            what="the Service to be re-applied",
        )
        assert cluster.must_get("service", "mail")["metadata"]["labels"]["team"] == "mail-admins"


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


class TestDelete:
    def test_children_are_collected_and_the_spool_retained(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """Deleting the SmtpRelay removes ConfigMap, Deployment, Service; the PVC stays."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        cluster.kubectl("delete", "smtprelay", "mail")
        wait_for(
            lambda: (
                not any(
                    exists(cluster, kind, name)
                    for kind, name in (
                        ("configmap", "mail-config"),
                        ("deployment", "mail"),
                        ("service", "mail"),
                    )
                )
            ),
            timeout=CONVERGE,
            what="the garbage collector to remove the children",
        )
        assert exists(cluster, "persistentvolumeclaim", "mail-spool")

    def test_spool_goes_too_when_not_retained(self, cluster: Cluster, operator: Operator) -> None:
        """retainOnDelete: false → the spool PVC is garbage-collected with the relay."""
        create_relay(cluster, "mail", {"storage": {"retainOnDelete": False}})
        wait_ready(cluster, "mail")
        claim = cluster.must_get("persistentvolumeclaim", "mail-spool")
        assert claim["metadata"]["ownerReferences"][0]["kind"] == "SmtpRelay"
        cluster.kubectl("delete", "smtprelay", "mail")
        wait_for(
            lambda: (
                not exists(cluster, "persistentvolumeclaim", "mail-spool")
                and not exists(cluster, "deployment", "mail")
            ),
            timeout=CONVERGE,
            what="the spool PVC and Deployment to be garbage-collected",
        )

    def test_no_finalizer_on_the_smtprelay(self, cluster: Cluster, operator: Operator) -> None:
        """Deletion needs no operator: no finalizer, so a stopped operator never blocks it."""
        create_relay(cluster, "mail")
        relay = wait_ready(cluster, "mail")
        assert not relay["metadata"].get("finalizers")
        operator.stop()
        cluster.kubectl("delete", "smtprelay", "mail", "--timeout=30s")
        assert cluster.get("smtprelay", "mail") is None


class TestRestart:
    def test_restart_creates_no_duplicates_and_changes_nothing(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A restarted operator resumes without touching a settled SmtpRelay or its children."""
        create_relay(cluster, "mail", {"gateway": {"host": "gw.example.com"}})
        wait_ready(cluster, "mail")

        def versions() -> dict[str, str]:
            named = [("smtprelay", "mail")] + [(k, p.format("mail")) for k, p in CHILDREN]
            return {
                f"{kind}/{name}": cluster.must_get(kind, name)["metadata"]["resourceVersion"]
                for kind, name in named
            }

        def settled_versions() -> dict[str, str]:
            """Versions once two reads agree: the controllers may still be finishing up."""
            last: dict[str, dict[str, str]] = {"seen": {}}

            def stable() -> bool:
                now = versions()
                same = now == last["seen"]
                last["seen"] = now
                return same

            wait_for(stable, timeout=CONVERGE, what="the objects to settle")
            return last["seen"]

        before = settled_versions()
        operator.stop()
        operator.start()
        wait_for(
            lambda: "applied generation 1" in operator.log(),
            timeout=CONVERGE,
            what="the restarted operator to resume the SmtpRelay",
        )
        wait_for(
            lambda: "re-applied Deployment mail" in operator.log(),
            timeout=CONVERGE,
            what="the restarted operator to see the Deployment",
        )
        assert versions() == before
        selector = f"{api.INSTANCE_LABEL}=mail"
        for kind in ("configmap", "deployment", "persistentvolumeclaim", "service", "replicaset"):
            assert len(cluster.list(kind, selector)) == 1, kind
