"""The operator against a real control plane: create, update, delete, restart, scale."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from smtprelay_operator import api

from tests.operator.support import (
    CHILDREN,
    CONVERGE,
    Cluster,
    Operator,
    condition,
    create_relay,
    exists,
    relay_manifest,
    relay_yaml,
    template_hash,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.cluster


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
        assert (
            status["configHash"]
            == hashlib.sha256(
                cluster.must_get("configmap", "mail-config")["data"]["relay.yaml"].encode()
            ).hexdigest()
        )
        assert status["readyReplicas"] == 1
        assert relay_yaml(cluster, "mail")["hostname"] == f"mail.{cluster.namespace}.svc"

    def test_conditions_have_the_standard_shape(self, cluster: Cluster, operator: Operator) -> None:
        """Ready, Progressing, Degraded with status, reason, message, times and generation."""
        create_relay(cluster, "mail")
        relay = wait_ready(cluster, "mail")
        conditions = relay["status"]["conditions"]
        assert [c["type"] for c in conditions] == [
            "Ready",
            "Progressing",
            "Degraded",
            "Reconciling",
            "Stalled",
        ]
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

    def test_kopf_leaves_no_trace_and_the_user_gets_an_event(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """No finalizer, no kopf annotations (the work queue keeps its state in memory),
        and one Applied Event."""
        create_relay(cluster, "mail")
        relay = wait_ready(cluster, "mail")
        assert not relay["metadata"].get("finalizers")
        ours = [
            key
            for key in relay["metadata"].get("annotations") or {}
            if not key.startswith("kubectl.")
        ]
        assert ours == []
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
    def test_gateway_change_rewrites_config_and_keeps_the_pod(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """A new gateway.host reaches relay.yaml; the pod template stays (the relay takes
        the file live); status.configHash and observedGeneration follow."""
        create_relay(cluster, "mail", {"gateway": {"host": "old.example.com"}})
        relay = wait_ready(cluster, "mail")
        before = cluster.must_get("deployment", "mail")
        cluster.patch("smtprelay", "mail", {"spec": {"gateway": {"host": "new.example.com"}}})
        wait_for(
            lambda: relay_yaml(cluster, "mail")["gateway"]["host"] == "new.example.com",
            timeout=CONVERGE,
            what="relay.yaml to carry the new gateway",
        )

        def reported() -> bool:
            current = cluster.must_get("smtprelay", "mail")
            return bool(
                current["status"].get("observedGeneration") == relay["metadata"]["generation"] + 1
            )

        wait_for(reported, timeout=CONVERGE, what="status.observedGeneration to follow")
        relay = wait_ready(cluster, "mail")
        text = cluster.must_get("configmap", "mail-config")["data"]["relay.yaml"]
        assert relay["status"]["configHash"] == hashlib.sha256(text.encode()).hexdigest()
        after = cluster.must_get("deployment", "mail")
        assert after["metadata"]["generation"] == before["metadata"]["generation"]

    def test_restart_only_change_rolls_the_pod(self, cluster: Cluster, operator: Operator) -> None:
        """workers cannot change in a running relay: the pod template's restart hash does."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        before = template_hash(cluster, "mail")
        cluster.patch("smtprelay", "mail", {"spec": {"workers": 2}})
        wait_for(
            lambda: template_hash(cluster, "mail") != before,
            timeout=CONVERGE,
            what="the pod template's restart hash to change",
        )
        wait_ready(cluster, "mail")

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
        """A PVC resize the cluster refuses (no expandable StorageClass) → Degraded and
        Reconciling ApplyFailed, retried; relay.yaml still updates. Shrinking back is refused
        by the CRD itself (a claim can only grow)."""
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
        assert condition(cluster.must_get("smtprelay", "mail"), "Reconciling")["reason"] == (
            "ApplyFailed"
        )
        refused = cluster.apply(relay_manifest("mail", {"storage": {"size": "1Gi"}}))
        assert "spec.storage.size: Forbidden: storage.size cannot shrink" in refused.stderr

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
        """Twenty SmtpRelays applied at once all become Ready, each with its own objects
        (two Services: SMTP and the headless metrics one)."""
        names = [f"relay-{index:02d}" for index in range(20)]
        for name in names:
            create_relay(cluster, name)
        for name in names:
            wait_ready(cluster, name)
        per_relay = {"configmap": 1, "deployment": 1, "persistentvolumeclaim": 1, "service": 2}
        for kind, count in per_relay.items():
            selector = f"{api.MANAGED_BY_LABEL}=smtprelay-operator"
            assert len(cluster.list(kind, selector)) == count * len(names), kind


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
            lambda: "reconciled mail" in operator.log(),
            timeout=CONVERGE,
            what="the restarted operator to resume the SmtpRelay",
        )
        assert versions() == before
        selector = f"{api.INSTANCE_LABEL}=mail"
        per_relay = {
            "configmap": 1,
            "deployment": 1,
            "persistentvolumeclaim": 1,
            "service": 2,
            "replicaset": 1,
        }
        for kind, count in per_relay.items():
            assert len(cluster.list(kind, selector)) == count, kind
