"""Start the relay the way its pod would, as a host process, for fast kwok-based tests.

The demo and tests/e2e run the relay in real pods (devcluster's node). Tests that only need
the relay as rendered, quickly and on kwok's fake node, take the relay container out of the
rendered Deployment and run it as a local process: its
command, arguments and environment as rendered, its ConfigMap volumes written out as files,
its PersistentVolumeClaim a local directory. Only what a pod gets from its node is replaced:
mount paths become local directories and the listen addresses become free loopback ports
(the Service's job in a cluster). Everything else — every relay setting — is the operator's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.peers import free_port, wait_for


def _relay_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    [container] = [c for c in containers if c["name"] == "relay"]
    return dict(container)


@dataclass
class RelayPod:
    """One relay process standing in for the Deployment's pod."""

    workdir: Path
    spool_dir: Path
    smtp_port: int
    metrics_port: int
    argv: list[str]
    env: dict[str, str]
    config_text: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for(self.ready, timeout=30, what="the relay pod's /readyz")

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = self.log_path.read_text(errors="replace")
            raise AssertionError(f"relay exited {self.process.returncode}:\n{log}")
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> int:
        """SIGTERM, as the kubelet sends on a rollout; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(40)
        self._log.close()
        return int(self.process.returncode)

    def queued(self) -> list[str]:
        queue = self.spool_dir / "queue"
        return sorted(p.name for p in queue.glob("*.eml") if not p.name.startswith("."))


def _local_mounts(
    container: dict[str, Any],
    pod_spec: dict[str, Any],
    config_maps: dict[str, dict[str, Any]],
    workdir: Path,
    spool_dir: Path,
) -> dict[str, Path]:
    """Mount path in the pod → local directory, with ConfigMap keys written out as files."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        local = workdir / "volumes" / mount["name"]
        if "persistentVolumeClaim" in volume:
            local = spool_dir
        elif "configMap" in volume:
            local.mkdir(parents=True, exist_ok=True)
            data = config_maps[volume["configMap"]["name"]].get("data", {})
            for key, text in data.items():
                (local / key).write_text(text)
        local.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = local
    return mounts


def _localise(value: str, mounts: dict[str, Path]) -> str:
    for pod_path, local in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if value == pod_path or value.startswith(pod_path.rstrip("/") + "/"):
            return str(local) + value[len(pod_path.rstrip("/")) :]
    return value


def prepare(
    *,
    deployment: dict[str, Any],
    config_maps: dict[str, dict[str, Any]],
    workdir: Path,
    spool_dir: Path | None = None,
) -> RelayPod:
    """Everything needed to run the Deployment's relay container here, not yet started."""
    workdir.mkdir(parents=True, exist_ok=True)
    spool = spool_dir or workdir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    pod_spec = deployment["spec"]["template"]["spec"]
    container = _relay_container(deployment)
    mounts = _local_mounts(container, pod_spec, config_maps, workdir, spool)

    argv = [
        _localise(arg, mounts) for arg in container.get("command", []) + container.get("args", [])
    ]
    # The image's PATH: the console scripts installed beside this interpreter come first.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    executable = shutil.which(argv[0], path=search)
    assert executable is not None, f"{argv[0]} is not on PATH"
    argv[0] = executable
    config_path = Path(next(arg for arg in argv if arg.endswith(".yaml")))

    # What the node and Service would provide: loopback ports and local paths.
    smtp_port, metrics_port = free_port(), free_port()
    document = yaml.safe_load(config_path.read_text())
    document["listen"] = f"127.0.0.1:{smtp_port}"
    document["metricsListen"] = f"127.0.0.1:{metrics_port}"
    document["spoolDir"] = _localise(document["spoolDir"], mounts)
    for section, key in (
        ("tls", "certFile"),
        ("tls", "keyFile"),
        ("auth", "usersFile"),
        ("gateway", "credentialsFile"),
    ):
        if isinstance(document.get(section), dict) and key in document[section]:
            document[section][key] = _localise(document[section][key], mounts)
    local_config = workdir / "relay.yaml"
    local_config.write_text(yaml.safe_dump(document, sort_keys=False))
    argv = [str(local_config) if Path(arg) == config_path else arg for arg in argv]

    env = dict(os.environ)
    env.update({item["name"]: item.get("value", "") for item in container.get("env", [])})
    return RelayPod(
        workdir=workdir,
        spool_dir=spool,
        smtp_port=smtp_port,
        metrics_port=metrics_port,
        argv=argv,
        env=env,
        config_text=config_path.read_text(),
        log_path=workdir / "relay.log",
    )
