"""The main job end to end: an SmtpRelay manifest ends as mail delivered.

The operator renders the objects on a real API server; the relay is then started from the
rendered Deployment and ConfigMap exactly as its pod would be (tests/podsim.py), because no
kubelet runs containers here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests import podsim
from tests.cluster.controlplane import ControlPlane
from tests.e2e.conftest import GATEWAY_HOST, MailWorld
from tests.operator.support import (
    Cluster,
    Operator,
    relay_manifest,
    running_operator,
    wait_for,
)
from tests.peers import free_port
from tests.relay.mail import Sender, send

ROOT = Path(__file__).resolve().parents[2]


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


class TestExamples:
    def test_every_example_is_accepted_by_the_api_server(self, cluster: Cluster) -> None:
        """examples/*.yaml pass the CRD's schema and CEL rules (server-side dry run)."""
        for path in sorted((ROOT / "examples").glob("*.yaml")):
            result = subprocess.run(
                [
                    str(cluster.plane.bin_dir / "kubectl"),
                    "apply",
                    "--dry-run=server",
                    "-n",
                    cluster.namespace,
                    "-f",
                    str(path),
                ],
                env=cluster.plane.env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            assert "created (server dry run)" in result.stdout, result.stdout
