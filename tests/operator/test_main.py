"""main: the smtprelay-operator command line."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from smtprelay_operator import main


class TestImage:
    def test_environment_names_the_relay_image(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """$SMTPRELAY_RELAY_IMAGE is the default relay image when set."""
        monkeypatch.setenv("SMTPRELAY_RELAY_IMAGE", "registry.example/relay:1")
        assert main.default_image() == "registry.example/relay:1"

    def test_release_image_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the variable, the relay image of this very release."""
        monkeypatch.delenv("SMTPRELAY_RELAY_IMAGE", raising=False)
        assert main.default_image() == f"ghcr.io/smtprelay/smtprelay:{version('smtprelay')}"


class TestArguments:
    def test_cluster_wide_by_default(self) -> None:
        """No --namespace: every namespace, liveness on 8080."""
        args = main.parse_args([])
        assert args.namespace == []
        assert args.liveness == "http://0.0.0.0:8080/healthz"
        assert args.relay_image is None

    def test_namespaces_repeat(self) -> None:
        """--namespace may be given more than once."""
        args = main.parse_args(["--namespace", "a", "-n", "b", "--relay-image", "img"])
        assert args.namespace == ["a", "b"]
        assert args.relay_image == "img"
