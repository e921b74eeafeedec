"""The running relay's current settings: built from relay.yaml, swapped when it changes.

`reload.ConfigWatcher` notices a new relay.yaml or new gateway credentials; this module
builds what the stages read (the settings for sessions, a `schedule.Setup` for delivery
attempts), swaps them in the `reload.Live` holders, and reports each switch in the log
(``config_reloaded``, ``config_refused``, ``credentials_reloaded``), in the metrics and on
``/config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from smtprelay import logs, reload
from smtprelay.config import RelayConfig
from smtprelay.deliver import Credentials
from smtprelay.logs import system_log
from smtprelay.metrics import METRICS
from smtprelay.reload import Live
from smtprelay.route import MxResolver
from smtprelay.schedule import Setup


class CredentialsError(Exception):
    """The gateway credentials cannot be read; the message names the setting."""


def load_credentials(path: Path | None) -> Credentials | None:
    """A Secret mounted as a directory (``username``, ``password`` files) or a YAML file."""
    if path is None:
        return None
    if path.is_dir():
        return Credentials(
            username=(path / "username").read_text().strip(),
            password=(path / "password").read_text().strip(),
        )
    data = yaml.safe_load(path.read_text())
    return Credentials(username=str(data["username"]), password=str(data["password"]))


def _credential_settings(config: RelayConfig) -> list[tuple[str, Path]]:
    files = [("gateway.credentialsFile", config.gateway.credentials_file)]
    files += [
        (f"routes[{index}].credentialsFile", rule.credentials_file)
        for index, rule in enumerate(config.routes)
    ]
    return [(field, path) for field, path in files if path is not None]


def credentials_of(config: RelayConfig) -> dict[Path, Credentials]:
    """Every credentialsFile (the gateway's, each route's), read now."""
    loaded: dict[Path, Credentials] = {}
    for field, path in _credential_settings(config):
        if path in loaded:
            continue
        try:
            credentials = load_credentials(path)
        except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
            raise CredentialsError(f"{field}: cannot read username and password: {error}") from None
        assert credentials is not None
        loaded[path] = credentials
    return loaded


def setup_for(config: RelayConfig, hostname: str, credentials: Mapping[Path, Credentials]) -> Setup:
    return Setup(
        settings=config,
        hostname=config.hostname or hostname,
        resolver=MxResolver(config.dns_servers),
        credentials=credentials,
    )


def credential_files(config: RelayConfig) -> list[Path]:
    """The files whose change means new credentials (a Secret directory's two keys)."""
    files: list[Path] = []
    for _, path in _credential_settings(config):
        files += [path / "username", path / "password"] if path.is_dir() else [path]
    return files


def watch(
    source: reload.Source,
    *,
    live: Live[RelayConfig],
    setup: Live[Setup],
    hostname: str,
    spool_dir: Path,
    on_switched: Callable[[], None] = lambda: None,
) -> reload.ConfigWatcher:
    """A watcher that switches ``live`` and ``setup`` to each valid new relay.yaml, and
    ``setup`` to new gateway credentials; ``on_switched`` after each switch."""
    log = system_log()
    path, loaded, overrides = source
    running = {"hash": loaded.hash}

    def switched(new: reload.Loaded) -> None:
        credentials: Mapping[Path, Credentials]
        try:
            credentials = credentials_of(new.config)
        except CredentialsError as error:
            log.error("credentials_unreadable", error=str(error))
            credentials = setup.current().credentials
        if new.config.logging != live.current().logging:
            logs.configure(new.config.logging, spool_dir=spool_dir, hostname=hostname)
        setup.swap(setup_for(new.config, hostname, credentials))
        live.swap(new.config)
        METRICS.config_info.labels(hash=running["hash"]).set(0)
        METRICS.config_info.labels(hash=new.hash).set(1)
        METRICS.config_reloads.labels(outcome="reloaded").inc()
        log.info("config_reloaded", hash=new.hash, previous=running["hash"], file=str(path))
        running["hash"] = new.hash
        on_switched()

    def refused(problem: reload.Refused) -> None:
        METRICS.config_reloads.labels(outcome="refused").inc()
        log.error(
            "config_refused",
            hash=problem.hash,
            problems=list(problem.problems),
            running=running["hash"],
        )

    def files_changed() -> None:
        try:
            credentials = credentials_of(live.current())
        except CredentialsError as error:
            log.error("credentials_unreadable", error=str(error))  # the old ones stay
            return
        setup.swap(dataclasses.replace(setup.current(), credentials=credentials))
        log.info("credentials_reloaded")

    METRICS.config_info.labels(hash=loaded.hash).set(1)
    return reload.ConfigWatcher(
        path,
        loaded,
        overrides=overrides,
        on_config=switched,
        on_refused=refused,
        companions=credential_files,
        on_files=files_changed,
    )


def config_state(watcher: reload.ConfigWatcher | None) -> dict[str, Any]:
    """What /config answers: the running relay.yaml's hash, and the last one refused."""
    if watcher is None:
        return {"hash": None, "reload": False}
    refused = watcher.refused
    return {
        "hash": watcher.loaded.hash,
        "loadedAt": watcher.loaded_at,
        "reload": True,
        "refused": None
        if refused is None
        else {"hash": refused.hash, "problems": list(refused.problems), "at": refused.at},
    }
