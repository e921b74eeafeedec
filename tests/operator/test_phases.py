"""A new or changed SmtpRelay's urgent pass applies what its pod needs, the rest follows.

Reconciles run in this process against the real control plane (no operator, no watch), so
each pass is one call and what it left is read back from the API server.
"""

from __future__ import annotations

import pytest
from smtprelay_operator import reconcile

from tests.operator.support import Cluster, create_relay, events, exists

pytestmark = pytest.mark.cluster

POD = (("configmap", "{}-config"), ("persistentvolumeclaim", "{}-spool"), ("deployment", "{}"))
OTHERS = (("service", "{}"), ("service", "{}-metrics"))


def _present(cluster: Cluster, kinds: tuple[tuple[str, str], ...], name: str) -> list[bool]:
    return [exists(cluster, kind, pattern.format(name)) for kind, pattern in kinds]


def _applied_events(cluster: Cluster, name: str) -> list[str]:
    return [e["message"] for e in events(cluster, name) if e["reason"] == "Applied"]


class TestPhases:
    def test_a_new_relay_gets_its_pod_objects_first_and_the_rest_next(
        self, cluster: Cluster, context: reconcile.Context
    ) -> None:
        """The urgent pass: ConfigMap, PVC, Deployment, nothing else (no Service, no Event,
        no status: nothing claims generation 1 yet). The next pass: the Services, the
        Applied Event and the status."""
        create_relay(cluster, "mail")
        outcome = reconcile.reconcile(context, cluster.namespace, "mail", urgent=True)
        assert outcome == reconcile.DEFERRED
        assert _present(cluster, POD, "mail") == [True, True, True]
        assert _present(cluster, OTHERS, "mail") == [False, False]
        assert "status" not in cluster.must_get("smtprelay", "mail")
        assert _applied_events(cluster, "mail") == []

        assert reconcile.reconcile(context, cluster.namespace, "mail", urgent=False) is True
        assert _present(cluster, OTHERS, "mail") == [True, True]
        relay = cluster.must_get("smtprelay", "mail")
        assert relay["status"]["observedGeneration"] == relay["metadata"]["generation"] == 1
        assert [m.startswith("generation 1:") for m in _applied_events(cluster, "mail")] == [True]

    def test_a_changed_relay_keeps_its_old_status_until_all_is_applied(
        self, cluster: Cluster, context: reconcile.Context
    ) -> None:
        """A spec change's urgent pass writes the new relay.yaml, while the status still
        speaks of generation 1 (the truth: 2 is not all applied yet); the next pass
        writes generation 2."""
        create_relay(cluster, "mail")
        reconcile.reconcile(context, cluster.namespace, "mail", urgent=False)
        before = cluster.must_get("smtprelay", "mail")["status"]
        cluster.patch("smtprelay", "mail", {"spec": {"delivery": {"tries": 7}}})

        outcome = reconcile.reconcile(context, cluster.namespace, "mail", urgent=True)
        assert outcome == reconcile.DEFERRED
        text = cluster.must_get("configmap", "mail-config")["data"]["relay.yaml"]
        assert "tries: 7" in text
        assert cluster.must_get("smtprelay", "mail")["status"] == before

        assert reconcile.reconcile(context, cluster.namespace, "mail", urgent=False) is True
        status = cluster.must_get("smtprelay", "mail")["status"]
        assert status["observedGeneration"] == 2
        assert status["configHash"] != before["configHash"]

    def test_a_settled_relay_is_not_split(
        self, cluster: Cluster, context: reconcile.Context
    ) -> None:
        """An urgent pass for a relay whose generation is all applied (an operator restart
        lists every SmtpRelay as new) does everything at once: a deleted Service is back."""
        create_relay(cluster, "mail")
        reconcile.reconcile(context, cluster.namespace, "mail", urgent=False)
        cluster.kubectl("delete", "service", "mail", "--wait=true")
        assert reconcile.reconcile(context, cluster.namespace, "mail", urgent=True) is True
        assert _present(cluster, OTHERS, "mail") == [True, True]
