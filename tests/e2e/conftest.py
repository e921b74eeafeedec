"""End-to-end fixtures: the kwok control plane's (for the examples) and the real node's."""

from __future__ import annotations

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


def pytest_collection_finish(session: pytest.Session) -> None:
    build_before_tests(session)
