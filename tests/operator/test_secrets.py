"""Creating an SmtpRelay must not become reading Secrets: images and Secrets are checked."""

from __future__ import annotations

import pytest

from tests.operator.support import (
    CONVERGE,
    Cluster,
    Operator,
    condition,
    create_relay,
    exists,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.cluster


def _stalled_with(cluster: Cluster, name: str, reason: str) -> bool:
    relay = cluster.must_get("smtprelay", name)
    stalled = condition(relay, "Stalled")
    return stalled.get("status") == "True" and stalled.get("reason") == reason


class TestSecretsStaySecret:
    def test_unlabelled_secret_is_refused_until_its_owner_labels_it(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """Naming a Secret not labelled smtprelay.dev/use=true: Stalled SecretNotAllowed,
        naming the field, and no relay pod; once labelled, the relay is created."""
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "db-login",
            "--from-literal=username=app",
            "--from-literal=password=hunter2",
        )
        spec = {"gateway": {"host": "gw.example.com", "credentialsSecret": "db-login"}}
        create_relay(cluster, "mail", spec)
        wait_for(
            lambda: _stalled_with(cluster, "mail", "SecretNotAllowed"),
            timeout=CONVERGE,
            what="Stalled SecretNotAllowed",
        )
        relay = cluster.must_get("smtprelay", "mail")
        assert condition(relay, "Stalled")["message"].startswith(
            "spec.gateway.credentialsSecret: Secret 'db-login' is not labelled"
        )
        assert not exists(cluster, "deployment", "mail")
        cluster.kubectl("label", "secret", "db-login", "smtprelay.dev/use=true")
        wait_ready(cluster, "mail")
        volumes = cluster.must_get("deployment", "mail")["spec"]["template"]["spec"]["volumes"]
        assert {"secretName": "db-login", "defaultMode": 0o440} in [
            volume.get("secret") for volume in volumes
        ]

    def test_image_off_the_allow_list_is_refused(
        self, cluster: Cluster, operator: Operator
    ) -> None:
        """spec.image outside the installer's allow-list: Stalled ImageNotAllowed, no pod."""
        create_relay(cluster, "mail", {"image": "docker.io/library/busybox:1"})
        wait_for(
            lambda: _stalled_with(cluster, "mail", "ImageNotAllowed"),
            timeout=CONVERGE,
            what="Stalled ImageNotAllowed",
        )
        assert not exists(cluster, "deployment", "mail")
        message = condition(cluster.must_get("smtprelay", "mail"), "Stalled")["message"]
        assert message.startswith("spec.image: 'docker.io/library/busybox:1' is not among")

    def test_image_on_the_allow_list_runs(self, cluster: Cluster, operator: Operator) -> None:
        """Another tag of the allowed repository is fine."""
        create_relay(cluster, "mail", {"image": "registry.example/smtprelay:other"})
        wait_ready(cluster, "mail")
        container = cluster.must_get("deployment", "mail")["spec"]["template"]["spec"][
            "containers"
        ][0]
        assert container["image"] == "registry.example/smtprelay:other"
