"""Build what a real node runs: containerd, kubelet, kube-proxy and a local pause image.

containerd comes from its Go module (`go install`); kubelet and kube-proxy from the same
`k8s.io/kubernetes` pin, module graph and version stamp as the control plane (a copy of its
throwaway module, so the control plane's stays as it was); the pod sandbox ("pause") image
is a static Go binary in an image built `FROM scratch` here, since registry.k8s.io is not
reachable. CNI plugins and runc are Debian's (scripts/setup.sh installs them).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from devcluster import build
from devcluster.cache import BuildError, cache_root, locked, run, say

CONTAINERD_VERSION = "v2.4.2"
CONTAINERD_COMMANDS = ("containerd", "containerd-shim-runc-v2", "ctr")
NODE_COMMANDS = ("kubelet", "kube-proxy")
PAUSE_IMAGE = "localhost/smtprelay-pause:1"
CNI_BIN_DIR = Path("/usr/lib/cni")
_COMPONENT = "node build"
_STAMP = ".complete"
_PAUSE_SOURCE = """\
// pause: the pod sandbox's process. Holds the namespaces, reaps nothing, exits on a signal.
package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsignals := make(chan os.Signal, 1)
\tsignal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
\t<-signals
}
"""
_PAUSE_CONTAINERFILE = 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'


@dataclasses.dataclass(frozen=True)
class NodeBinaries:
    """Where each piece of the node is, once built."""

    containerd_dir: Path
    kube_dir: Path
    pause_archive: Path
    runc: Path
    cni_dir: Path

    def containerd(self, name: str) -> Path:
        return self.containerd_dir / name

    def kube(self, name: str) -> Path:
        return self.kube_dir / name


def containerd_dir() -> Path:
    return cache_root() / f"containerd-{CONTAINERD_VERSION}" / "bin"


def kube_node_dir() -> Path:
    return cache_root() / f"k8s-{build.KUBERNETES_VERSION}" / "node-bin"


def _complete(directory: Path, names: tuple[str, ...]) -> bool:
    return (directory / _STAMP).is_file() and all((directory / n).is_file() for n in names)


def _go_env(go: str) -> dict[str, str]:
    return build._go_env(build.Toolchain(cache_root=cache_root(), go=go))


def _build_containerd(go: str) -> None:
    directory = containerd_dir()
    env = _go_env(go) | {"GOBIN": str(directory), "GOFLAGS": ""}
    say(_COMPONENT, f"containerd {CONTAINERD_VERSION} with go install (~2 min cold)")
    packages = [
        f"github.com/containerd/containerd/v2/cmd/{name}@{CONTAINERD_VERSION}"
        for name in CONTAINERD_COMMANDS
    ]
    run(
        [go, "install", "-trimpath", "-ldflags=-s -w", *packages],
        component=_COMPONENT,
        what="go install containerd",
        env=env,
        cwd=directory,
    )
    (directory / _STAMP).write_text(CONTAINERD_VERSION + "\n")


def _build_kube_node(go: str) -> None:
    """kubelet and kube-proxy in a copy of the control plane's module: same graph, same pin."""
    tools = build.Toolchain(cache_root=cache_root(), go=go)
    source = tools.src_dir / "kube"
    if not (source / "go.sum").is_file():
        raise BuildError(f"{source} has no go.sum: build the control plane first")
    module = tools.src_dir / "kube-node"
    module.mkdir(parents=True, exist_ok=True)
    for name in ("go.mod", "go.sum"):
        shutil.copy(source / name, module / name)
    env = _go_env(go)
    packages = [f"k8s.io/kubernetes/cmd/{name}" for name in NODE_COMMANDS]
    pinned = [f"{package}@{build.KUBERNETES_VERSION}" for package in packages]
    run(
        [go, "get", *pinned],
        component=_COMPONENT,
        what="resolve kubelet modules",
        cwd=module,
        env=env,
    )
    commit = build.read_pins(tools).commit  # cached by go: no download the second time
    say(_COMPONENT, "compiling kubelet and kube-proxy (~35 s with the control plane's cache warm)")
    directory = kube_node_dir()
    run(
        [
            go,
            "build",
            "-p",
            "2",
            "-trimpath",
            f"-ldflags={build.kube_ldflags(commit)}",
            "-o",
            f"{directory}/",
            *packages,
        ],
        component=_COMPONENT,
        what="go build kubelet kube-proxy",
        cwd=module,
        env=env,
    )
    (directory / _STAMP).write_text(build.KUBERNETES_VERSION + "\n")


def _build_pause(go: str, archive: Path) -> None:
    from devcluster import image  # podman as the image build runs it

    work = archive.parent / "pause-src"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text("module smtprelay.local/pause\n\ngo 1.26.0\n")
    (work / "main.go").write_text(_PAUSE_SOURCE)
    (work / "Containerfile").write_text(_PAUSE_CONTAINERFILE)
    env = _go_env(go) | {"GOFLAGS": ""}
    run(
        [go, "build", "-trimpath", "-ldflags=-s -w", "-o", "pause", "."],
        component=_COMPONENT,
        what="go build pause",
        cwd=work,
        env=env,
    )
    run(
        [*image.podman(), "build", f"--tag={PAUSE_IMAGE}", str(work)],
        component=_COMPONENT,
        what="podman build pause",
    )
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    run(
        [*image.podman(), "save", "--format=oci-archive", f"--output={partial}", PAUSE_IMAGE],
        component=_COMPONENT,
        what="podman save pause",
    )
    partial.rename(archive)


def pause_archive() -> Path:
    return cache_root() / "image" / "pause-1.oci.tar"


def ensure_node_built() -> NodeBinaries:
    """Build what is missing (containerd ~2 min cold, kubelet ~35 s warm); return the paths."""
    go = build.find_go()
    runc = Path(shutil.which("runc") or "/usr/sbin/runc")
    if not runc.exists() or not (CNI_BIN_DIR / "bridge").exists():
        raise BuildError("runc and containernetworking-plugins are needed; run scripts/setup.sh")
    with locked(containerd_dir()):
        if not _complete(containerd_dir(), CONTAINERD_COMMANDS):
            _build_containerd(go)
    build.ensure_built()
    with locked(kube_node_dir()):
        if not _complete(kube_node_dir(), NODE_COMMANDS):
            _build_kube_node(go)
    archive = pause_archive()
    with locked(archive.parent):
        if not archive.is_file():
            _build_pause(go, archive)
    return NodeBinaries(
        containerd_dir=containerd_dir(),
        kube_dir=kube_node_dir(),
        pause_archive=archive,
        runc=runc,
        cni_dir=CNI_BIN_DIR,
    )


def main() -> int:
    try:
        binaries = ensure_node_built()
    except BuildError as error:
        say(_COMPONENT, f"FAILED: {error}")
        return 1
    print(binaries.kube_dir)
    return 0
