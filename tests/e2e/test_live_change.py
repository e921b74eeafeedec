"""A mail-settings change reaches the running relay without a restart (kwok control plane,
the relay as a host process from the rendering: tests/podsim.py).

While a client sends every 100 ms, the gateway changes: the same relay process takes the
new relay.yaml once its ConfigMap volume is updated, the SmtpRelay is Reconciling until the
relay reports the new hash and then Ready for the new generation, and nothing is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import podsim
from tests.cluster.controlplane import ControlPlane
from tests.operator.support import (
    Cluster,
    Operator,
    relay_manifest,
    running_operator,
    wait_for,
)
from tests.peers import Dnsmasq, Sink, Zone, free_port
from tests.relay.mail import Sender, send

pytestmark = pytest.mark.cluster

MX_HOST = "127.0.0.2"
GATEWAY_HOST = "127.0.0.9"


class MailWorld:
    """dnsmasq naming mx.example.test as the MX of example.test, that MX, and a gateway."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dns = Dnsmasq(
            Zone(mx=[("example.test", "mx.example.test", 10)], a=[("mx.example.test", MX_HOST)]),
            workdir,
        )
        self.mx: Sink | None = None
        self.gateway = Sink(GATEWAY_HOST, self.port)

    def start_mx(self) -> Sink:
        self.mx = Sink(MX_HOST, self.port)
        return self.mx

    def stop_mx(self) -> None:
        if self.mx is not None:
            self.mx.stop()
            self.mx = None

    def stop(self) -> None:
        self.stop_mx()
        self.gateway.stop()
        self.dns.stop()


@pytest.fixture
def mail_world(tmp_path: Path) -> Iterator[MailWorld]:
    world = MailWorld(tmp_path)
    try:
        yield world
    finally:
        world.stop()


def _ready(cluster: Cluster, name: str) -> bool:
    relay = cluster.get("smtprelay", name) or {}
    conditions = relay.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _rendering(cluster: Cluster, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return cluster.must_get("deployment", name), cluster.must_get("configmap", f"{name}-config")


def _template_hash(deployment: dict[str, Any]) -> str:
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    [value] = [v for k, v in annotations.items() if "hash" in k]
    return str(value)


def _condition(cluster: Cluster, name: str, kind: str) -> dict[str, Any]:
    relay = cluster.get("smtprelay", name) or {}
    for item in relay.get("status", {}).get("conditions", []):
        if item["type"] == kind:
            found: dict[str, Any] = item
            return found
    return {}


class TestManifestToMail:
    def test_applied_relay_delivers_then_takes_a_gateway_change_live(
        self,
        control_plane: ControlPlane,
        cluster: Cluster,
        mail_world: MailWorld,
        tmp_path: Path,
    ) -> None:
        """Apply → the relay from the rendering runs → Ready once it reports the config's
        hash → delivers to the MX. Then, while a client sends every 100 ms, an edit to
        sendAll via a gateway: Reconciling until the relay (same process, same pod template)
        reports the new hash, then Ready for the new generation; no connection refused,
        nothing lost, the message queued before the change leaves through the gateway."""
        name = "e2e"
        metrics_port = free_port()
        asks = f"--relay-config-url=http://127.0.0.1:{metrics_port}/config"
        operator = Operator(
            control_plane, cluster.namespace, tmp_path / "operator", extra_args=(asks,)
        )
        (tmp_path / "operator").mkdir()
        cluster.spool_volume(name)
        spec = {
            "hostname": "e2e.example.com",
            "allowedNetworks": ["127.0.0.0/8"],  # the stand-in pod's clients are on loopback
            "dnsServers": [mail_world.dns.server],
            "delivery": {"port": mail_world.port, "queueTimer": "2s"},
            "logging": {"target": "stdout"},
        }
        with running_operator(operator):
            result = cluster.apply(relay_manifest(name, spec))
            assert result.returncode == 0, result.stderr
            wait_for(
                lambda: _condition(cluster, name, "Ready").get("reason") == "ConfigPending",
                timeout=90,
                what="the operator to wait for the relay to report its config",
            )
            spool = tmp_path / "spool"
            mx = mail_world.start_mx()
            deployment, config_map = _rendering(cluster, name)
            config_maps = {config_map["metadata"]["name"]: config_map}
            pod = podsim.prepare(
                deployment=deployment,
                config_maps=config_maps,
                workdir=tmp_path / "pod",
                spool_dir=spool,
                metrics_port=metrics_port,
            )
            pod.start()
            try:
                self._story(cluster, name, pod, mx, mail_world, deployment)
            finally:
                pod.stop()

    def _story(
        self,
        cluster: Cluster,
        name: str,
        pod: podsim.RelayPod,
        mx: Any,
        mail_world: MailWorld,
        deployment: dict[str, Any],
    ) -> None:
        wait_for(lambda: _ready(cluster, name), timeout=60, what="Ready once the relay reports")
        relay = cluster.must_get("smtprelay", name)
        assert relay["status"]["runningConfigHash"] == relay["status"]["configHash"]
        send(pod.smtp_port, "app@e2e.example.com", ["bob@example.test"], subject="first")
        [got] = mx.wait_for_messages()
        assert got.message["Subject"] == "first"
        assert "by e2e.example.com (smtprelay)" in got.message["Received"]

        # The MX goes away; a message is accepted and stays queued (deferred).
        mail_world.stop_mx()
        send(pod.smtp_port, "app@e2e.example.com", ["carol@example.test"], subject="queued")
        wait_for(lambda: len(pod.queued()) == 1, timeout=20, what="the message to be queued")

        sender = Sender(pod.smtp_port)
        try:
            generation = relay["metadata"]["generation"]
            cluster.patch(
                "smtprelay",
                name,
                {
                    "spec": {
                        "gateway": {"host": f"{GATEWAY_HOST}:{mail_world.port}", "sendAll": True}
                    }
                },
            )

            def reconciling() -> bool:
                current = cluster.must_get("smtprelay", name)
                return current["status"].get("observedGeneration") == generation + 1 and (
                    _condition(cluster, name, "Reconciling").get("status") == "True"
                )

            wait_for(reconciling, timeout=60, what="Reconciling for the new generation")
            assert _condition(cluster, name, "Ready")["status"] == "False"
            new_deployment, new_config = _rendering(cluster, name)
            assert _template_hash(new_deployment) == _template_hash(deployment), "no roll"
            assert "sendAll: true" in new_config["data"]["relay.yaml"]

            pod.sync({new_config["metadata"]["name"]: new_config})  # the kubelet's update
            wait_for(lambda: _ready(cluster, name), timeout=60, what="Ready for the new config")
            relay = cluster.must_get("smtprelay", name)
            assert relay["status"]["runningConfigHash"] == relay["status"]["configHash"]
            assert _condition(cluster, name, "Ready")["observedGeneration"] == generation + 1
            wait_for(lambda: len(sender.sent) >= 10, timeout=30, what="mail during the change")
        finally:
            sender.stop()
        assert sender.errors == []
        subjects = {"queued", *sender.sent}
        got_all = mail_world.gateway.wait_for_messages(len(subjects), timeout=60)
        assert {str(m.message["Subject"]) for m in got_all} == subjects
        wait_for(lambda: pod.queued() == [], timeout=20, what="the spool to empty")
