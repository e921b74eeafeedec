"""Kubeconfig files for the test control plane: the admin's, and token-only ones."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

CLUSTER_NAME = "smtprelay-test"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write(
    path: Path, *, server: str, ca_pem: bytes, user: str, credentials: dict[str, str]
) -> Path:
    """One cluster, one user, one context, certificates inline so the file travels alone."""
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CLUSTER_NAME,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def write_client_cert(
    path: Path, *, server: str, ca_pem: bytes, user: str, cert_pem: bytes, key_pem: bytes
) -> Path:
    return write(
        path,
        server=server,
        ca_pem=ca_pem,
        user=user,
        credentials={"client-certificate-data": _b64(cert_pem), "client-key-data": _b64(key_pem)},
    )


def write_token(path: Path, *, server: str, ca_pem: bytes, user: str, token: str) -> Path:
    return write(path, server=server, ca_pem=ca_pem, user=user, credentials={"token": token})
