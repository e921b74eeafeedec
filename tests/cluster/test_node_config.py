"""The real node's configuration, as pure data: what keeps pods on this machine and what
makes containerd and volumes work here."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from devcluster import node, provisioner
from devcluster.nodebuild import PAUSE_IMAGE, NodeBinaries

_BINARIES = NodeBinaries(
    containerd_dir=Path("/c"),
    kube_dir=Path("/k"),
    pause_archive=Path("/p.tar"),
    runc=Path("/usr/sbin/runc"),
    cni_dir=Path("/usr/lib/cni"),
)


def _claim(**annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "mail-spool",
            "namespace": "ns",
            "uid": "u-1",
            "annotations": annotations,
        },
        "spec": {"resources": {"requests": {"storage": "1Gi"}}, "accessModes": ["ReadWriteOnce"]},
        "status": {"phase": "Pending"},
    }


class TestContainerd:
    def test_config_keeps_state_in_the_run_dir_and_uses_debians_runc(self, tmp_path: Path) -> None:
        """Everything containerd writes is under the run dir; runc without systemd; the
        sandbox image is the local pause image; oom_score_adj is not lowered."""
        config = tomllib.loads(node.containerd_config(tmp_path, _BINARIES, tmp_path / "cni"))
        assert config["version"] == 3
        assert config["root"].startswith(str(tmp_path))
        assert config["state"].startswith(str(tmp_path))
        runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
        assert runtime["restrict_oom_score_adj"] is True
        runc = runtime["containerd"]["runtimes"]["runc"]["options"]
        assert runc == {
            "BinaryName": "/usr/sbin/runc",
            "Root": f"{tmp_path}/containerd/runc",
            "SystemdCgroup": False,
        }
        images = config["plugins"]["io.containerd.cri.v1.images"]
        assert images["pinned_images"]["sandbox"] == PAUSE_IMAGE


class TestCni:
    def test_pods_get_no_default_route(self, tmp_path: Path) -> None:
        """Only Services and the node IP are routed: nothing a pod sends can leave."""
        [bridge] = node.cni_config(tmp_path, "10.96.0.0/16")["plugins"]
        assert bridge["ipMasq"] is False
        routes = [route["dst"] for route in bridge["ipam"]["routes"]]
        assert routes == ["10.96.0.0/16", f"{node.NODE_IP}/32"]
        assert "0.0.0.0/0" not in routes


class TestProvisioner:
    def test_a_scheduled_claim_gets_a_local_volume_on_that_node(self) -> None:
        """The scheduler's selected-node decides; the PV is pre-bound and node-affine."""
        claim = _claim(**{"volume.kubernetes.io/selected-node": "n1"})
        assert provisioner.wants_volume(claim, node="n1", classes={provisioner.STORAGE_CLASS})
        pv = provisioner.volume_for(claim, node="n1", path=Path("/v/pvc-u-1"))
        assert pv["spec"]["local"] == {"path": "/v/pvc-u-1"}
        assert pv["spec"]["claimRef"]["uid"] == "u-1"
        [term] = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert term["matchExpressions"][0]["values"] == ["n1"]

    def test_an_unscheduled_or_foreign_claim_is_left_alone(self) -> None:
        """No volume before a pod is scheduled, nor for another node or class."""
        classes = {provisioner.STORAGE_CLASS}
        assert not provisioner.wants_volume(_claim(), node="n1", classes=classes)
        other = _claim(**{"volume.kubernetes.io/selected-node": "n2"})
        assert not provisioner.wants_volume(other, node="n1", classes=classes)
        claim = _claim(**{"volume.kubernetes.io/selected-node": "n1"})
        claim["spec"]["storageClassName"] = "fast"
        assert not provisioner.wants_volume(claim, node="n1", classes=classes)
