"""The main job on a real node: the chart's operator pod and the relay pods run the image
built here under containerd and a kubelet; mail goes through the Service's ClusterIP to an
MX on this machine. Nothing is simulated: probes, mounts, fsGroup, signals and the Service
are the kubelet's and kube-proxy's own."""

from __future__ import annotations

import smtplib
from typing import Any

from devcluster import cluster as devcluster
from devcluster import deploy
from devcluster.controlplane import ControlPlane, wait_for
from tests.e2e.realnode import NodeMail

RELAY = "mail"


def _send(address: str, *, to: str, subject: str) -> str:
    """One message to the relay's Service (port 25), as an application in the cluster would."""
    with smtplib.SMTP(address, 25, timeout=30) as client:
        client.ehlo("app.test")
        message = f"From: app@e2e.example.com\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello\r\n"
        client.sendmail("app@e2e.example.com", [to], message)
        code, reply = client.noop()
        assert code == 250, reply
        return subject


def _service_answers(address: str) -> bool:
    """The Service routes to a relay: kube-proxy has the ready pod's endpoint (a Recreate
    rollout leaves the Service without one for a moment; clients retry, so does this)."""
    try:
        with smtplib.SMTP(address, 25, timeout=5) as client:
            return client.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


def _exec(plane: ControlPlane, namespace: str, *command: str, check: bool = True) -> str:
    return plane.kubectl(
        "-n", namespace, "exec", f"deploy/{RELAY}", "-c", "relay", "--", *command, check=check
    )


def _queued(plane: ControlPlane, namespace: str) -> list[str]:
    """Queue ids in the running pod's spool, from the relay's own `queue list`."""
    out = _exec(plane, namespace, "smtprelay", "queue", "--spool", "/var/spool/smtprelay", "list")
    rows = [line for line in out.splitlines() if line and not line[0].isspace()]
    return [row.split()[0] for row in rows if not row.startswith(("Queue ID", "--", "Mail queue"))]


def _relay(namespace: str, mail: NodeMail, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hostname": "e2e.example.com",
        "dnsServers": [mail.dns.server],
        "delivery": {"port": mail.mx_port, "queueTimer": "2s"},
        "logging": {"target": "stdout"},
        **extra,
    }
    return {
        "apiVersion": "smtprelay.dev/v1alpha1",
        "kind": "SmtpRelay",
        "metadata": {"name": RELAY, "namespace": namespace},
        "spec": spec,
    }


class TestRealNode:
    def test_relay_pod_from_the_image_delivers_through_its_service(
        self,
        real_cluster: devcluster.Cluster,
        operator_release: str,
        relay_namespace: str,
        node_mail: NodeMail,
    ) -> None:
        """Chart → operator pod → SmtpRelay Ready only once the kubelet's readiness probe
        passed → a message to the Service's ClusterIP reaches the MX; the relay runs as
        10001 on a read-only root with its spool writable through fsGroup."""
        plane = real_cluster.plane
        operator_pods = plane.kubectl(
            "-n",
            deploy.OPERATOR_NAMESPACE,
            "get",
            "pods",
            "-o",
            "jsonpath={.items[*].spec.nodeName}",
        )
        assert operator_pods.split() == ["smtprelay-node"]

        deploy.apply(plane, _relay(relay_namespace, node_mail))
        deploy.wait_relay_ready(plane, RELAY, relay_namespace, timeout=120)
        pod = deploy.ready_pod(plane, RELAY, relay_namespace)
        assert pod is not None, "SmtpRelay Ready without a Ready pod"
        relay_ready = deploy.condition(
            deploy.get(plane, "smtprelay", RELAY, relay_namespace), "Ready"
        )
        assert (
            deploy.condition(pod, "Ready")["lastTransitionTime"]
            <= relay_ready["lastTransitionTime"]
        )
        [container] = pod["status"]["containerStatuses"]
        assert container["image"] == real_cluster.image.name

        mx = node_mail.start_mx()
        address = deploy.service_ip(plane, RELAY, relay_namespace)
        wait_for(lambda: _service_answers(address), timeout=30, what="the Service to answer")
        _send(address, to="bob@example.test", subject="first")
        [got] = mx.wait_for_messages(timeout=60)
        assert got.message["Subject"] == "first"
        assert "by e2e.example.com (smtprelay)" in got.message["Received"]

        assert _exec(plane, relay_namespace, "id", "-u").strip() == "10001"
        refused = _exec(
            plane,
            relay_namespace,
            "python3",
            "-c",
            "import sys\ntry:\n open('/probe', 'w')\nexcept OSError as e:\n print(e)",
        )
        assert "Read-only file system" in refused
        logs = plane.kubectl("-n", relay_namespace, "logs", f"deploy/{RELAY}", "-c", "relay")
        assert "bob@example.test" in logs

    def test_a_deleted_pod_loses_nothing_and_a_spec_change_keeps_mail_flowing(
        self,
        real_cluster: devcluster.Cluster,
        operator_release: str,
        relay_namespace: str,
        node_mail: NodeMail,
    ) -> None:
        """MX down → a message is queued on the PV → `kubectl delete pod` → the next pod
        delivers it from the same volume; then sendAll via a gateway reaches the same pod
        without a restart (the kubelet updates the mounted relay.yaml, the relay switches)
        and mail goes on through the gateway."""
        plane = real_cluster.plane
        deploy.apply(plane, _relay(relay_namespace, node_mail))
        deploy.wait_relay_ready(plane, RELAY, relay_namespace, timeout=120)
        address = deploy.service_ip(plane, RELAY, relay_namespace)
        wait_for(lambda: _service_answers(address), timeout=30, what="the Service to answer")
        _send(address, to="carol@example.test", subject="queued")
        wait_for(
            lambda: len(_queued(plane, relay_namespace)) == 1,
            timeout=30,
            what="the message to be queued (the MX is down)",
        )
        pod = deploy.ready_pod(plane, RELAY, relay_namespace)
        assert pod is not None
        old = pod["metadata"]["name"]
        plane.kubectl("-n", relay_namespace, "delete", "pod", old, "--wait=true", timeout=90)
        mx = node_mail.start_mx()

        def replaced() -> bool:
            new = deploy.ready_pod(plane, RELAY, relay_namespace)
            return new is not None and new["metadata"]["name"] != old

        wait_for(replaced, timeout=90, what="a new relay pod")
        [got] = mx.wait_for_messages(timeout=60)
        assert got.message["Subject"] == "queued"

        before = deploy.ready_pod(plane, RELAY, relay_namespace)
        assert before is not None
        gateway = f"{node_mail.gateway.host}:{node_mail.gateway_port}"
        plane.kubectl(
            "-n",
            relay_namespace,
            "patch",
            "smtprelay",
            RELAY,
            "--type=merge",
            "-p",
            f'{{"spec": {{"gateway": {{"host": "{gateway}", "sendAll": true}}}}}}',
        )

        def reloaded() -> bool:
            logs = plane.kubectl(
                "-n", relay_namespace, "logs", f"deploy/{RELAY}", "-c", "relay", check=False
            )
            # Every worker process watches relay.yaml on its own: mail sent before the last
            # one has switched may be delivered by a worker still on the old settings.
            lines = logs.splitlines()
            started = sum("started" in line and "recovered" in line for line in lines)
            switched = sum("config_reloaded" in line for line in lines)
            return started > 0 and switched >= started

        # The kubelet updates the ConfigMap volume on its next sync (up to ~2 minutes).
        wait_for(reloaded, timeout=180, what="the relay to take the new relay.yaml live")
        now = deploy.ready_pod(plane, RELAY, relay_namespace)
        assert now is not None
        assert now["metadata"]["uid"] == before["metadata"]["uid"], "no restart"
        _send(address, to="dave@example.test", subject="after")
        [through] = node_mail.gateway.wait_for_messages(timeout=60)
        assert through.message["Subject"] == "after"
        assert _queued(plane, relay_namespace) == []
