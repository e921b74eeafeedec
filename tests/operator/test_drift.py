"""Drift: what someone else changes or deletes in the operator's objects is put back."""

from __future__ import annotations

import json

import pytest

from tests.operator.support import (
    CONVERGE,
    Cluster,
    Operator,
    create_relay,
    exists,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.cluster


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
