"""Fixtures for operator tests against the real control plane (tests/cluster).

Each test gets its own namespace and its own operator watching only that namespace, so
tests cannot see each other's objects and a restart test can stop its operator without
disturbing others.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from smtprelay_operator import api, reconcile, render
from smtprelay_operator.events import Recorder
from smtprelay_operator.kube import Kube

from tests.cluster.controlplane import ControlPlane
from tests.operator.support import (
    CRD_FILE,
    TEST_IMAGE,
    Cluster,
    Operator,
    running_operator,
    wait_for,
)


@pytest.fixture(scope="session")
def smtprelay_crd(control_plane: ControlPlane) -> str:
    """The committed CRD, installed and served (discoverable by kubectl)."""
    control_plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    name = f"{api.PLURAL}.{api.GROUP}"
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")

    def served() -> bool:
        result = control_plane.kubectl("get", "smtprelays", "-A", check=False)
        return "error" not in result.lower()

    wait_for(served, timeout=60, what="SmtpRelay to be served")
    return name


@pytest.fixture
def cluster(
    control_plane: ControlPlane, kube_namespace: str, smtprelay_crd: str
) -> Iterator[Cluster]:
    """kubectl in this test's namespace; PersistentVolumes made for it are removed after."""
    here = Cluster(control_plane, kube_namespace)
    yield here
    with contextlib.suppress(RuntimeError):
        control_plane.kubectl(
            "delete", "pv", "-l", f"smtprelay.test/namespace={kube_namespace}", "--wait=false"
        )


@pytest.fixture
def operator(control_plane: ControlPlane, cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    """The operator, running as cluster admin, watching only this test's namespace."""
    with running_operator(Operator(control_plane, cluster.namespace, tmp_path)) as running:
        yield running


@pytest.fixture
def context(control_plane: ControlPlane) -> Iterator[reconcile.Context]:
    """A reconcile context as the operator makes it (a stage's objects applied side by
    side), for tests that run reconciles in this process against the real control plane."""
    with control_plane.api_client() as api_client, ThreadPoolExecutor(2) as side:
        kube = Kube(api_client)
        yield reconcile.Context(
            kube=kube,
            recorder=Recorder(kube, component=api.FIELD_MANAGER, instance=socket.gethostname()),
            defaults=render.OperatorDefaults(relay_image=TEST_IMAGE),
            side=side,
        )
