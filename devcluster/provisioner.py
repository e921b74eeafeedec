"""A tiny dynamic provisioner: one directory and one `local` PersistentVolume per claim.

The controller manager's hostPath provisioner makes `0750 root:root` directories and
fsGroup is never applied to hostPath, so a non-root pod cannot write its volume. `local`
volumes get fsGroup like any real disk. This follows the external-provisioner protocol:
the StorageClass is WaitForFirstConsumer, the scheduler names the node on the claim
(`volume.kubernetes.io/selected-node`), we create a PV pre-bound to the claim with that
node's affinity; a released PV is deleted with its directory.

Run as `python -m devcluster.provisioner --kubeconfig K --root DIR --node NAME`.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

PROVISIONER = "smtprelay.dev/local-dir"
STORAGE_CLASS = "local-dir"
_SELECTED_NODE = "volume.kubernetes.io/selected-node"
_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
_INTERVAL = 0.5


def storage_class() -> dict[str, Any]:
    """The cluster's default class, so claims that name none get a real volume."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Delete",
    }


def volume_for(claim: dict[str, Any], *, node: str, path: Path) -> dict[str, Any]:
    """The `local` PV for `claim` on `node` at `path`, pre-bound to the claim."""
    meta = claim["metadata"]
    spec = claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": f"pvc-{meta['uid']}",
            "annotations": {_PROVISIONED_BY: PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": spec.get("storageClassName") or STORAGE_CLASS,
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "local": {"path": str(path)},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [node],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    }


def wants_volume(claim: dict[str, Any], *, node: str, classes: set[str]) -> bool:
    """A pending claim of our class whose pod the scheduler has put on our node."""
    annotations = claim["metadata"].get("annotations") or {}
    return (
        claim.get("status", {}).get("phase") == "Pending"
        and not claim["spec"].get("volumeName")
        and (claim["spec"].get("storageClassName") or STORAGE_CLASS) in classes
        and annotations.get(_SELECTED_NODE) == node
    )


class Provisioner:
    def __init__(self, *, kubeconfig: Path, root: Path, node: str) -> None:
        from kubernetes import client, config  # deferred: importing it takes a second

        configuration = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
        self.api = client.ApiClient(configuration)
        # The client's models are typed; the bodies here are plain manifests, as kubectl's.
        self.core: Any = client.CoreV1Api(self.api)
        self.storage: Any = client.StorageV1Api(self.api)
        self.root = root
        self.node = node

    def _our_classes(self) -> set[str]:
        return {
            item.metadata.name
            for item in self.storage.list_storage_class().items
            if item.provisioner == PROVISIONER
        }

    def step(self) -> None:
        """One pass: volumes for waiting claims, released volumes deleted."""
        classes = self._our_classes()
        claims = self.api.sanitize_for_serialization(  # type: ignore[no-untyped-call]
            self.core.list_persistent_volume_claim_for_all_namespaces().items
        )
        existing = {pv.metadata.name for pv in self.core.list_persistent_volume().items}
        for claim in claims:
            if not wants_volume(claim, node=self.node, classes=classes):
                continue
            name = f"pvc-{claim['metadata']['uid']}"
            if name in existing:
                continue
            path = self.root / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)  # kubelet applies fsGroup (group-owned, setgid) on mount
            self.core.create_persistent_volume(volume_for(claim, node=self.node, path=path))
        for pv in self.core.list_persistent_volume().items:
            annotations = pv.metadata.annotations or {}
            if annotations.get(_PROVISIONED_BY) == PROVISIONER and pv.status.phase in (
                "Released",
                "Failed",
            ):
                shutil.rmtree(self.root / pv.metadata.name, ignore_errors=True)
                self.core.delete_persistent_volume(pv.metadata.name)

    def run(self, stop: threading.Event) -> None:
        from kubernetes.client import ApiException

        self.storage.create_storage_class(storage_class())
        while not stop.is_set():
            try:
                self.step()
            except (ApiException, OSError) as error:  # the API server may be restarting
                print(f"provisioner: {error}", flush=True)
            stop.wait(_INTERVAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.provisioner", description=__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--node", required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(yaml.safe_dump(storage_class()), flush=True)
    Provisioner(kubeconfig=args.kubeconfig, root=args.root, node=args.node).run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
