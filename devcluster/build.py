"""Build the pinned Kubernetes control plane from Go modules, the way envtest ships one.

There is no release binary or container runtime to lean on, so the binaries come from
`go build` against the module proxy. Each tool gets its own throwaway module in the
cache directory so their dependency graphs never have to agree with each other.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from devcluster.cache import BuildError, cache_root, run

__all__ = ["BuildError", "cache_root", "ensure_built"]

KUBERNETES_VERSION = "v1.36.3"
KWOK_VERSION = "v0.8.0"

KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
BINARIES = (*KUBE_COMMANDS, "etcd", "kwok")
KWOK_STAGES = "kwok-stages.yaml"
# kwok's own "fast" stages (what kwokctl installs), plus the plain heartbeat so the
# node lifecycle controller never sees the fake node go stale.
_KWOK_STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat/node-heartbeat.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
_STAMP = ".complete"
_LDFLAGS_BASE = "-s -w"


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Where the build reads and writes; all outside the repository."""

    cache_root: Path
    go: str

    @property
    def root(self) -> Path:
        return self.cache_root / f"k8s-{KUBERNETES_VERSION}"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def src_dir(self) -> Path:
        return self.root / "src"


def bin_dir() -> Path:
    return cache_root() / f"k8s-{KUBERNETES_VERSION}" / "bin"


def find_go() -> str:
    found = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(found).exists():
        raise BuildError("no `go` on PATH or at /usr/local/go/bin/go; install Go 1.26+")
    return found


def is_complete(directory: Path) -> bool:
    """True when a previous build finished: the stamp and every binary are present."""
    stamp = directory / _STAMP
    if not stamp.is_file():
        return False
    return all((directory / name).is_file() for name in (*BINARIES, KWOK_STAGES))


def ensure_built(*, log: bool = True) -> Path:
    """Build every binary unless the cache already holds them; return the bin directory."""
    tools = Toolchain(cache_root=cache_root(), go=find_go())
    if is_complete(tools.bin_dir):
        return tools.bin_dir
    tools.root.mkdir(parents=True, exist_ok=True)
    # Two pytest sessions (or CI steps) may race for a cold cache; one builds, one waits.
    with (tools.root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_complete(tools.bin_dir):
            _build_all(tools, log=log)
    return tools.bin_dir


def _say(message: str) -> None:
    print(f"[cluster build] {message}", file=sys.stderr, flush=True)


def _go_env(tools: Toolchain) -> dict[str, str]:
    env = dict(os.environ)
    env["GOTOOLCHAIN"] = "local"
    env["GOFLAGS"] = "-mod=mod"
    env["CGO_ENABLED"] = "0"
    # Keep go on PATH for any tool that shells out to it.
    env["PATH"] = f"{Path(tools.go).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(tools: Toolchain, args: list[str], *, cwd: Path, what: str) -> str:
    """Run `go ARGS`, echoing a heartbeat; raise with the output's tail on failure."""
    return run([tools.go, *args], component="cluster build", what=what, cwd=cwd, env=_go_env(tools))


@dataclasses.dataclass(frozen=True)
class KubernetesPins:
    """What the release's own go.mod says: staging modules and the etcd it was tested with."""

    staging: tuple[str, ...]
    etcd_version: str
    commit: str


def read_pins(tools: Toolchain) -> KubernetesPins:
    out = _run(
        tools,
        ["mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=tools.root,
        what=f"download k8s.io/kubernetes@{KUBERNETES_VERSION}",
    )
    info = json.loads(out[out.index("{") :])
    return parse_pins(Path(info["GoMod"]).read_text(), Path(info["Info"]).read_text())


def parse_pins(go_mod: str, info_json: str = "{}") -> KubernetesPins:
    """Staging modules are those required at v0.0.0 and replaced by `./staging/...`."""
    replaced = set(re.findall(r"^\s*(k8s\.io/\S+)\s+=>\s+\./staging/", go_mod, re.MULTILINE))
    required = re.findall(r"^\s*(k8s\.io/\S+)\s+v0\.0\.0\s*(?://.*)?$", go_mod, re.MULTILINE)
    staging = tuple(sorted(m for m in set(required) if m in replaced))
    etcd = re.search(r"^\s*go\.etcd\.io/etcd/server/v3\s+(v\S+)", go_mod, re.MULTILINE)
    if not staging or etcd is None:
        raise BuildError("k8s.io/kubernetes go.mod has no staging replaces or no etcd pin")
    origin = json.loads(info_json).get("Origin", {})
    return KubernetesPins(
        staging=staging, etcd_version=etcd.group(1), commit=str(origin.get("Hash", ""))
    )


def staging_version(kubernetes_version: str) -> str:
    """v1.36.3 -> v0.36.3, the tag every staging module is published at."""
    major, minor, patch = kubernetes_version.lstrip("v").split(".", 2)
    if major != "1":
        raise BuildError(f"unexpected Kubernetes version {kubernetes_version}")
    return f"v0.{minor}.{patch}"


def kube_go_mod(pins: KubernetesPins) -> str:
    replaces = "\n".join(
        f"\t{module} => {module} {staging_version(KUBERNETES_VERSION)}" for module in pins.staging
    )
    return (
        "module smtprelay.local/kube\n\n"
        "go 1.26.0\n\n"
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\n"
        f"replace (\n{replaces}\n)\n"
    )


def kube_ldflags(commit: str) -> str:
    """Stamp the pinned tag so /version reports it, not v0.0.0-master."""
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitCommit": commit,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    flags = [_LDFLAGS_BASE]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags.extend(f"-X {package}.{key}={value}" for key, value in values.items())
    return " ".join(flags)


def _module(tools: Toolchain, name: str, go_mod: str) -> Path:
    directory = tools.src_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "go.mod").write_text(go_mod)
    return directory


def _build_kube(tools: Toolchain, pins: KubernetesPins) -> None:
    packages = [f"k8s.io/kubernetes/cmd/{cmd}" for cmd in KUBE_COMMANDS]
    directory = _module(tools, "kube", kube_go_mod(pins))
    # Without @version `go get` would take the newest kubernetes, not the pinned one.
    pinned = [f"{package}@{KUBERNETES_VERSION}" for package in packages]
    _run(tools, ["get", *pinned], cwd=directory, what="resolve kubernetes modules")
    _say(f"compiling {', '.join(KUBE_COMMANDS)} (the long part: about 6 min cold on 2 cores)")
    _run(
        tools,
        [
            "build",
            "-p",
            "2",
            "-v",
            "-trimpath",
            f"-ldflags={kube_ldflags(pins.commit)}",
            "-o",
            f"{tools.bin_dir}/",
            *packages,
        ],
        cwd=directory,
        what="go build kubernetes",
    )


def _build_single(
    tools: Toolchain, *, name: str, module: str, version: str, package: str, ldflags: str
) -> None:
    directory = _module(tools, name, f"module smtprelay.local/{name}\n\ngo 1.26.0\n")
    _run(tools, ["get", f"{module}@{version}"], cwd=directory, what=f"resolve {module}@{version}")
    _run(
        tools,
        [
            "build",
            "-p",
            "2",
            "-v",
            "-trimpath",
            f"-ldflags={ldflags}",
            "-o",
            str(tools.bin_dir / name),
            package,
        ],
        cwd=directory,
        what=f"go build {name}",
    )


def _copy_kwok_stages(tools: Toolchain) -> None:
    """Ship kwok's stage configs beside its binary; without them pods never turn Ready."""
    out = _run(
        tools,
        ["mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"],
        cwd=tools.src_dir / "kwok",
        what="locate kwok stages",
    )
    source = Path(json.loads(out[out.index("{") :])["Dir"])
    documents = [(source / name).read_text().strip() for name in _KWOK_STAGE_FILES]
    (tools.bin_dir / KWOK_STAGES).write_text("\n---\n".join(documents) + "\n")


def _build_all(tools: Toolchain, *, log: bool) -> None:
    started = time.monotonic()
    tools.bin_dir.mkdir(parents=True, exist_ok=True)
    (tools.bin_dir / _STAMP).unlink(missing_ok=True)
    if log:
        _say(f"building Kubernetes {KUBERNETES_VERSION} + etcd + kwok into {tools.bin_dir}")
    pins = read_pins(tools)
    _say(
        f"etcd pinned by kubernetes go.mod: {pins.etcd_version}; "
        f"{len(pins.staging)} staging modules at {staging_version(KUBERNETES_VERSION)}"
    )
    _build_kube(tools, pins)
    _build_single(
        tools,
        name="etcd",
        module="go.etcd.io/etcd/server/v3",
        version=pins.etcd_version,
        package="go.etcd.io/etcd/server/v3",
        ldflags=_LDFLAGS_BASE,
    )
    _build_single(
        tools,
        name="kwok",
        module="sigs.k8s.io/kwok",
        version=KWOK_VERSION,
        package="sigs.k8s.io/kwok/cmd/kwok",
        ldflags=f"{_LDFLAGS_BASE} -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",
    )
    _copy_kwok_stages(tools)
    stamp = {
        "kubernetes": KUBERNETES_VERSION,
        "etcd": pins.etcd_version,
        "kwok": KWOK_VERSION,
        "seconds": round(time.monotonic() - started),
    }
    (tools.bin_dir / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    _say(f"done in {stamp['seconds']}s: {tools.bin_dir}")


def main() -> int:
    try:
        directory = ensure_built()
    except BuildError as error:
        print(f"[cluster build] FAILED: {error}", file=sys.stderr)
        return 1
    print(directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
