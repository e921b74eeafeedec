"""An operator that never gives up and never spams, against real API refusals.

The refusals come from the real API server: a ValidatingAdmissionPolicy in the test's
namespace refuses what the test says, the way a webhook, a quota or a policy engine would.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client, watch
from smtprelay_operator import api

from tests.operator.support import (
    CONVERGE,
    Cluster,
    Operator,
    condition,
    create_relay,
    events,
    exists,
    refusing,
    relay_yaml,
    template_hash,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.cluster

BLOCKED = "blocked.example.com"
STUCK_FOR = 60.0


def _config_map(name: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"relay.yaml": text},
    }


def _writes_during(
    kube_api: client.ApiClient,
    cluster: Cluster,
    name: str,
    current: dict[str, Any],
    *,
    seconds: float,
) -> int:
    """How many times SmtpRelay ``name`` is written in the next ``seconds`` (a watch)."""
    custom = client.CustomObjectsApi(kube_api)
    stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
        custom.list_namespaced_custom_object,
        api.GROUP,
        api.VERSION,
        cluster.namespace,
        api.PLURAL,
        field_selector=f"metadata.name={name}",
        resource_version=current["metadata"]["resourceVersion"],
        timeout_seconds=int(seconds),
    )
    return sum(1 for event in stream if event["type"] == "MODIFIED")


class TestStuckApply:
    """A stuck apply: retried with backoff, reported once, and never rolls the pod alone."""

    def test_failed_config_map_holds_the_deployment_back_and_does_not_spam(
        self, cluster: Cluster, operator: Operator, kube_api: client.ApiClient
    ) -> None:
        """While the new relay.yaml is refused: the Deployment is not touched (the pod
        template keeps its hash although the change also needs a new pod), the status
        says Reconciling/ApplyFailed, one counted Event (not one per retry) and no stream of
        writes to the SmtpRelay; once the refusal ends, the retry applies it all."""
        create_relay(cluster, "mail", {"gateway": {"host": "old.example.com"}})
        relay = wait_ready(cluster, "mail")
        before = template_hash(cluster, "mail")
        with refusing(
            cluster,
            resource="configmaps",
            expression=f"!object.data['relay.yaml'].contains('{BLOCKED}')",
            message="relay.yaml names a blocked gateway",
            probe=_config_map("probe", f"gateway: {BLOCKED}"),
        ):
            # A change to both: relay.yaml (refused) and the pod (workers: a restart).
            cluster.patch(
                "smtprelay", "mail", {"spec": {"gateway": {"host": BLOCKED}, "workers": 2}}
            )

            def reported() -> bool:
                current = cluster.must_get("smtprelay", "mail")
                return condition(current, "Reconciling").get("reason") == "ApplyFailed"

            wait_for(reported, timeout=CONVERGE, what="Reconciling with reason ApplyFailed")
            stuck = cluster.must_get("smtprelay", "mail")
            assert "blocked gateway" in condition(stuck, "Degraded")["message"]
            assert condition(stuck, "Ready")["status"] == "False"
            # The observation window itself: a minute of the apply being refused.
            writes = _writes_during(kube_api, cluster, "mail", stuck, seconds=STUCK_FOR)
            assert writes <= 1, f"{writes} writes to the SmtpRelay in a minute of retries"
            assert template_hash(cluster, "mail") == before, "the pod rolled onto a missing config"
            failed = [e for e in events(cluster, "mail") if e["reason"] == "ApplyFailed"]
            assert len(failed) == 1, failed
            assert 3 <= failed[0]["count"] <= 10, "retried, with backoff"
        # The refusal has ended: the next retry (up to one backoff later, ~64 s after a
        # minute of failures) applies the ConfigMap, then the Deployment.
        wait_for(
            lambda: relay_yaml(cluster, "mail")["gateway"]["host"] == BLOCKED,
            timeout=CONVERGE + 70,
            what="the retried apply to go through",
        )
        wait_for(
            lambda: template_hash(cluster, "mail") != before,
            timeout=CONVERGE,
            what="the Deployment to follow its ConfigMap",
        )
        final = wait_ready(cluster, "mail")
        assert final["status"]["observedGeneration"] == relay["metadata"]["generation"] + 1


class TestDriftRetried:
    def test_a_restore_that_fails_is_retried_until_it_works(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """The Service is deleted while re-creating it is refused; once the refusal ends the
        retry (not a new event: none comes) puts it back."""
        create_relay(cluster, "mail")
        wait_ready(cluster, "mail")
        probe = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "probe", "labels": {"app.kubernetes.io/instance": "x"}},
            "spec": {"ports": [{"port": 25}]},
        }
        with refusing(
            cluster,
            resource="services",
            expression="!has(object.metadata.labels) || "
            "!('app.kubernetes.io/instance' in object.metadata.labels)",
            message="no relay Services today",
            probe=probe,
        ):
            cluster.kubectl("delete", "service", "mail")

            def failing() -> bool:
                current = cluster.must_get("smtprelay", "mail")
                return "no relay Services today" in condition(current, "Degraded").get(
                    "message", ""
                )

            wait_for(failing, timeout=CONVERGE, what="the failed restore to be reported")
            assert not exists(cluster, "service", "mail")
        wait_for(
            lambda: exists(cluster, "service", "mail"),
            timeout=CONVERGE,
            what="the Service to be restored on retry",
        )
        wait_ready(cluster, "mail")
