"""Pytest plugin: a real control plane per session, namespaces and ServiceAccounts per test.

Load it from the top-level `tests/conftest.py` with
`pytest_plugins = ["tests.cluster.fixtures"]`. The control plane is built when the cache is
cold and is never skipped: a build or start failure is a test error, not a skip.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from devcluster import accounts, build, controlplane
from devcluster.controlplane import ControlPlane

_NAMESPACE_READY_TIMEOUT = 30.0
_BUILD_ERROR = pytest.StashKey[build.BuildError]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: the test talks to the real control plane (tests/cluster)"
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build before the first test starts, so a cold build never eats a test's timeout."""
    if session.config.option.collectonly:
        return
    if not any("control_plane" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    # Show the build's progress live: a cold build runs for minutes.
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            build.ensure_built()
        except build.BuildError as error:
            # Reported by the fixture, so each cluster test errors instead of pytest
            # aborting with an INTERNALERROR.
            session.config.stash[_BUILD_ERROR] = error


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, controller manager, scheduler and kwok, up for the session."""
    failed = pytestconfig.stash.get(_BUILD_ERROR, None)
    if failed is not None:
        raise failed
    plane = controlplane.start(bin_dir=build.ensure_built())
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An admin `ApiClient` (system:masters) for the session's control plane."""
    with control_plane.api_client() as api:
        yield api


@pytest.fixture
def kube_namespace(kube_api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists, so pods are admitted at once."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def default_account_exists() -> bool:
        accounts_here = core.list_namespaced_service_account(name).items
        return any(
            account.metadata and account.metadata.name == "default" for account in accounts_here
        )

    controlplane.wait_for(
        default_account_exists,
        timeout=_NAMESPACE_READY_TIMEOUT,
        what=f"ServiceAccount {name}/default",
    )
    try:
        yield name
    finally:
        core.delete_namespace(name)


ServiceAccountKubeconfig = Callable[..., Path]


@pytest.fixture
def service_account_kubeconfig(control_plane: ControlPlane) -> ServiceAccountKubeconfig:
    """`make(namespace=, name=)` -> kubeconfig path authenticating as that ServiceAccount."""

    def make(*, namespace: str, name: str, expiration_seconds: int = 3600) -> Path:
        return accounts.service_account_kubeconfig(
            control_plane, namespace=namespace, name=name, expiration_seconds=expiration_seconds
        )

    return make
