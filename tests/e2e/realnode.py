"""Fixtures for the main job on a real node (devcluster.cluster): the cluster itself, the
chart installed once per session, and a mail world the pods can reach on the node's IP."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import cluster as devcluster
from devcluster import deploy, node
from devcluster.cache import BuildError
from tests.peers import Dnsmasq, Sink, Zone, free_port

_BUILD_ERROR = pytest.StashKey[BuildError]()


def build_before_tests(session: pytest.Session) -> None:
    """Build (or find cached) everything the real node runs before the first test starts."""
    if session.config.option.collectonly:
        return
    if not any("real_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            devcluster.ensure_built()
        except BuildError as error:
            session.config.stash[_BUILD_ERROR] = error


@pytest.fixture(scope="package")
def real_cluster(pytestconfig: pytest.Config) -> Iterator[devcluster.Cluster]:
    """Control plane + containerd/kubelet/kube-proxy node + provisioner + the relay image."""
    failed = pytestconfig.stash.get(_BUILD_ERROR, None)
    if failed is not None:
        raise failed
    running = devcluster.start()
    try:
        yield running
    finally:
        problems = running.stop()
        assert problems == [], f"the node left the host changed: {problems}"


@pytest.fixture(scope="package")
def operator_release(real_cluster: devcluster.Cluster) -> Iterator[str]:
    """The chart installed with its defaults: the operator pod runs the image just built."""
    result = deploy.install_chart(real_cluster.plane)
    assert result["status"] == "deployed"
    try:
        yield deploy.RELEASE
    finally:
        deploy.uninstall_chart(real_cluster.plane)


@pytest.fixture
def relay_namespace(real_cluster: devcluster.Cluster) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    real_cluster.plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        real_cluster.plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


class NodeMail:
    """dnsmasq naming mx.example.test (MX of example.test) on the node IP, that MX, and a
    gateway: the only addresses the pods can reach besides Services."""

    def __init__(self, workdir: Path) -> None:
        self.mx_port = free_port(node.NODE_IP)
        self.gateway_port = free_port(node.NODE_IP)
        self.dns = Dnsmasq(
            Zone(
                mx=[("example.test", "mx.example.test", 10)],
                a=[("mx.example.test", node.NODE_IP)],
            ),
            workdir,
            address=node.NODE_IP,
        )
        self.mx: Sink | None = None
        self.gateway = Sink(node.NODE_IP, self.gateway_port)

    def start_mx(self) -> Sink:
        self.mx = Sink(node.NODE_IP, self.mx_port)
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
def node_mail(real_cluster: devcluster.Cluster, tmp_path: Path) -> Iterator[NodeMail]:
    world = NodeMail(tmp_path)
    try:
        yield world
    finally:
        world.stop()
