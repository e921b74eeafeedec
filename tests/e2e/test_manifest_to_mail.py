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
from tests.e2e.conftest import GATEWAY_HOST, MailWorld
from tests.operator.support import Cluster, Operator, relay_manifest, wait_for
from tests.relay.mail import send

ROOT = Path(__file__).resolve().parents[2]


def _ready(cluster: Cluster, name: str) -> bool:
    relay = cluster.get("smtprelay", name) or {}
    conditions = relay.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _rendering(cluster: Cluster, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return cluster.must_get("deployment", name), cluster.must_get("configmap", f"{name}-config")


def _pod(cluster: Cluster, name: str, workdir: Path, spool: Path) -> podsim.RelayPod:
    deployment, config_map = _rendering(cluster, name)
    pod = podsim.prepare(
        deployment=deployment,
        config_maps={config_map["metadata"]["name"]: config_map},
        workdir=workdir,
        spool_dir=spool,
    )
    pod.start()
    return pod


def _template_hash(deployment: dict[str, Any]) -> str:
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    [value] = [v for k, v in annotations.items() if "hash" in k]
    return str(value)


class TestManifestToMail:
    def test_applied_relay_delivers_then_follows_an_edit_to_the_gateway(
        self, cluster: Cluster, operator: Operator, mail_world: MailWorld, tmp_path: Path
    ) -> None:
        """Apply → Ready → relay from the rendering delivers to the MX; edit to sendAll via a
        gateway → new ConfigMap and pod hash → the restarted relay delivers through the
        gateway, including a message queued before the restart."""
        name = "e2e"
        cluster.spool_volume(name)
        spec = {
            "hostname": "e2e.example.com",
            "allowedNetworks": ["127.0.0.0/8"],  # the stand-in pod's clients are on loopback
            "dnsServers": [mail_world.dns.server],
            "delivery": {"port": mail_world.port, "queueTimer": "2s"},
            "logging": {"target": "stdout"},
        }
        result = cluster.apply(relay_manifest(name, spec))
        assert result.returncode == 0, result.stderr
        wait_for(lambda: _ready(cluster, name), timeout=90, what="the SmtpRelay to be Ready")

        spool = tmp_path / "spool"
        mx = mail_world.start_mx()
        pod = _pod(cluster, name, tmp_path / "pod-1", spool)
        send(pod.smtp_port, "app@e2e.example.com", ["bob@example.test"], subject="first")
        [got] = mx.wait_for_messages()
        assert got.message["Subject"] == "first"
        assert "by e2e.example.com (smtprelay)" in got.message["Received"]

        # The MX goes away; a message is accepted and stays queued (deferred).
        mail_world.stop_mx()
        send(pod.smtp_port, "app@e2e.example.com", ["carol@example.test"], subject="queued")
        wait_for(lambda: len(pod.queued()) == 1, timeout=20, what="the message to be queued")
        old_deployment, old_config = _rendering(cluster, name)

        cluster.patch(
            "smtprelay",
            name,
            {"spec": {"gateway": {"host": f"{GATEWAY_HOST}:{mail_world.port}", "sendAll": True}}},
        )

        def rerendered() -> bool:
            deployment, config = _rendering(cluster, name)
            return config["data"] != old_config["data"] and _template_hash(
                deployment
            ) != _template_hash(old_deployment)

        wait_for(rerendered, timeout=60, what="a new ConfigMap and pod-template hash")
        new_config = cluster.must_get("configmap", f"{name}-config")["data"]["relay.yaml"]
        assert f"host: {GATEWAY_HOST}:{mail_world.port}" in new_config
        assert "sendAll: true" in new_config

        assert pod.stop() == 0  # the rollout: SIGTERM, then a new pod on the same volume
        assert len(pod.queued()) == 1
        pod = _pod(cluster, name, tmp_path / "pod-2", spool)
        try:
            [queued] = mail_world.gateway.wait_for_messages(timeout=30)
            assert queued.message["Subject"] == "queued"
            send(pod.smtp_port, "app@e2e.example.com", ["dave@example.test"], subject="after")
            got_all = mail_world.gateway.wait_for_messages(2, timeout=30)
            assert [m.message["Subject"] for m in got_all] == ["queued", "after"]
            wait_for(lambda: pod.queued() == [], timeout=20, what="the spool to empty")
        finally:
            pod.stop()


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
