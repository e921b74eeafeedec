"""``smtprelay serve`` as a process with its own spool and config, for the benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.peers import free_port, wait_for


class Relay:
    """The relay under measurement; ``wrap`` runs it under a profiler (``py-spy record ...``)."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        wrap: list[str] | None = None,
        source: Path | None = None,
    ):
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        self.spool = workdir / "spool"
        self.config = {
            "listen": f"127.0.0.1:{self.port}",
            "metricsListen": f"127.0.0.1:{self.metrics_port}",
            "spoolDir": str(self.spool),
            "hostname": "relay.bench.test",
            "allowedNetworks": ["127.0.0.0/8"],  # the load comes from loopback
            **config,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "relay.log"
        self._wrap = wrap or []
        self._env = None
        if source is not None:  # another revision's relay/ (see bench.baseline), first on the path
            self._env = {**os.environ, "PYTHONPATH": str(source)}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The relay's own pid, also when it runs under a profiler."""
        assert self.process is not None
        if not self._wrap:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        found = wait_for(lambda: children.read_text().split(), timeout=10, what="relay pid")
        return int(found[0])

    def start(self, *, timeout: float = 60) -> float:
        """Start ``smtprelay serve``; returns seconds until ``/readyz`` answers 200."""
        begin = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self._wrap,
                    sys.executable,
                    "-m",
                    "smtprelay",
                    "serve",
                    "--config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        wait_for(self.ready, timeout=timeout, what="the relay's /readyz")
        return time.monotonic() - begin

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"relay exited {self.process.returncode}:\n{self.log_path.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus counter's samples whose labels include ``labels``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        pattern = re.compile(rf"^{re.escape(name)}(?:_total)?(\{{[^}}]*\}})? (\S+)$", re.M)
        for match in pattern.finditer(text):
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(2))
        return total

    def stop(self, *, timeout: float = 60) -> int:
        """SIGTERM (to the profiler too, which then writes its report); returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            if self._wrap:
                os.kill(self.pid, signal.SIGTERM)
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)
