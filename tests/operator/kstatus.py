"""The real kstatus (sigs.k8s.io/cli-utils/pkg/kstatus), as Flux and Helm 4 run it.

A 30-line Go program (kstatus_src/main.go) reads one object as JSON and prints what
``status.Compute`` says: ``<Status> <message>``. Built once with the Go toolchain that
builds the test control plane, cached under ~/.cache/smtprelay.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from devcluster import build, cache

CLI_UTILS = "sigs.k8s.io/cli-utils"
CLI_UTILS_VERSION = "v0.37.2"
APIMACHINERY_VERSION = "v0.31.0"
SOURCE = Path(__file__).with_name("kstatus_src") / "main.go"


def _root() -> Path:
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return cache.cache_root() / f"kstatus-{CLI_UTILS_VERSION}-{source}"


def ensure_built() -> Path:
    """The kstatus binary, built unless cached (the source's content is in the path)."""
    root = _root()
    binary = root / "bin" / "kstatus"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        src = root / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        shutil.copy(SOURCE, src / "main.go")
        (src / "go.mod").write_text("module smtprelay.dev/kstatus\n\ngo 1.23\n")
        go = build.find_go()
        env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="0")
        for args in (
            [
                "get",
                f"{CLI_UTILS}@{CLI_UTILS_VERSION}",
                f"k8s.io/apimachinery@{APIMACHINERY_VERSION}",
            ],
            ["build", "-o", str(binary), "."],
        ):
            result = subprocess.run(
                [go, *args],
                cwd=src,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if result.returncode != 0:
                raise cache.BuildError(f"go {args[0]} kstatus: {result.stderr[-2000:]}")
    return binary


def compute(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) as kstatus computes them for ``obj``."""
    result = subprocess.run(
        [str(ensure_built())],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    status, _, message = result.stdout.strip().partition(" ")
    return status, message
