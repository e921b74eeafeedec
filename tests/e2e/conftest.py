"""End-to-end fixtures: the operator's cluster fixtures, plus a local mail world."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.realnode import (  # noqa: F401 -- fixtures, re-exported for pytest
    build_before_tests,
    node_mail,
    operator_release,
    real_cluster,
    relay_namespace,
)
from tests.operator.conftest import (  # noqa: F401 -- fixtures, re-exported for pytest
    cluster,
    operator,
    smtprelay_crd,
)
from tests.peers import Dnsmasq, Sink, Zone, free_port

MX_HOST = "127.0.0.2"
GATEWAY_HOST = "127.0.0.9"


def pytest_collection_finish(session: pytest.Session) -> None:
    build_before_tests(session)


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
