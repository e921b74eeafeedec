"""main: the smtprelay-operator command line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import kopf
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

    def test_log_format_defaults_to_kopfs_own(self) -> None:
        """Without --log-format, kopf's default: full (time, logger, level, message)."""
        assert main.parse_args([]).log_format == "full"

    @pytest.mark.parametrize("name", ["plain", "full", "json"])
    def test_log_formats(self, name: str) -> None:
        """Each of kopf's formats is accepted by name."""
        assert main.parse_args([f"--log-format={name}"]).log_format == name

    def test_unknown_log_format_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Anything else is a usage error naming the option and the choices."""
        with pytest.raises(SystemExit) as caught:
            main.parse_args(["--log-format", "yaml"])
        assert caught.value.code == 2
        error = capsys.readouterr().err
        assert "--log-format" in error
        assert "'full', 'json', 'plain'" in error


class TestMain:
    @pytest.fixture
    def calls(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
        """What main() passes to kopf.configure and kopf.run (neither runs)."""
        recorded: dict[str, dict[str, Any]] = {}

        def record(name: str) -> Callable[..., None]:
            def call(**kwargs: Any) -> None:
                recorded[name] = kwargs

            return call

        monkeypatch.setattr(kopf, "configure", record("configure"))
        monkeypatch.setattr(kopf, "run", record("run"))
        return recorded

    @pytest.mark.parametrize(
        ("argv", "log_format"),
        [
            ([], kopf.LogFormat.FULL),
            (["--log-format=plain"], kopf.LogFormat.PLAIN),
            (["--log-format", "json"], kopf.LogFormat.JSON),
        ],
    )
    def test_log_format_reaches_kopf(
        self, calls: dict[str, dict[str, Any]], argv: list[str], log_format: kopf.LogFormat
    ) -> None:
        """--log-format becomes kopf's LogFormat; the log level flags pass through with it."""
        main.main([*argv, "--verbose"])
        assert calls["configure"] == {"verbose": True, "debug": False, "log_format": log_format}
        assert calls["run"]["standalone"] is True

    @pytest.mark.parametrize(("argv", "level"), [([], logging.WARNING), (["-v"], logging.NOTSET)])
    def test_kopfs_per_event_lines_only_when_verbose(
        self, calls: dict[str, dict[str, Any]], argv: list[str], level: int
    ) -> None:
        """Without -v, kopf's "Handler ... succeeded" (INFO, two a watch event) is not
        logged; its warnings are. With -v, everything kopf says."""
        kopf_objects = logging.getLogger(main.KOPF_OBJECTS_LOGGER)
        kopf_objects.setLevel(logging.NOTSET)
        try:
            main.main(argv)
            assert kopf_objects.level == level
        finally:
            kopf_objects.setLevel(logging.NOTSET)
