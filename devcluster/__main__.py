"""`python -m devcluster build|image|up|down|env` — the local cluster, for humans and CI.

`up` starts the cluster with a real node (control plane, containerd, kubelet, kube-proxy,
volume provisioner, the relay image imported) in the background and records it in a state
file; `down` stops what that file names, by PID, and restores the host. `up --kwok` starts
the control plane with kwok's fake node instead (no containers run; no host changes).
`up --foreground` stays attached until Ctrl-C.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from devcluster import build, cluster, controlplane, image, nodebuild
from devcluster.cache import BuildError


def kwok_state_file() -> Path:
    return build.bin_dir().parent / "current.json"


def _env_lines(plane: controlplane.ControlPlane) -> list[str]:
    return [
        f"export KUBECONFIG={shlex.quote(str(plane.kubeconfig))}",
        f"export PATH={shlex.quote(str(plane.bin_dir))}:$PATH",
    ]


def _build(_: argparse.Namespace) -> int:
    code = build.main()
    return code or nodebuild.main()


def _image(_: argparse.Namespace) -> int:
    return image.main()


def _wait_for_ctrl_c(stop_all: Callable[[], object]) -> int:
    print("Ctrl-C stops it.", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_all()
    return 0


def _up(args: argparse.Namespace) -> int:
    for path in (cluster.state_file(), kwok_state_file()):
        if path.exists():
            print(f"a cluster is already up ({path}); run `down` first", file=sys.stderr)
            return 1
    try:
        if args.kwok:
            plane = controlplane.start(bin_dir=build.ensure_built())
            stop_all: Callable[[], object] = plane.stop
            save: Callable[[Path], None] = plane.save_state
            state = kwok_state_file()
        else:
            running = cluster.start()
            plane, stop_all, save, state = (
                running.plane,
                running.stop,
                running.save_state,
                cluster.state_file(),
            )
    except (BuildError, controlplane.StartError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"cluster up at {plane.server}; logs in {plane.run_dir / 'logs'}", file=sys.stderr)
    if args.foreground:
        print("\n".join(_env_lines(plane)), file=sys.stderr)
        return _wait_for_ctrl_c(stop_all)
    save(state)
    print("\n".join(_env_lines(plane)))
    return 0


def _down(_: argparse.Namespace) -> int:
    if cluster.state_file().exists():
        problems = cluster.Cluster.load_state(cluster.state_file()).stop()
        cluster.state_file().unlink()
        for problem in problems:
            print(f"not restored: {problem}", file=sys.stderr)
        print("cluster stopped, host restored", file=sys.stderr)
        return 1 if problems else 0
    if kwok_state_file().exists():
        controlplane.ControlPlane.load_state(kwok_state_file()).stop()
        kwok_state_file().unlink()
        print("control plane stopped", file=sys.stderr)
        return 0
    print("no cluster is up", file=sys.stderr)
    return 0


def _env(_: argparse.Namespace) -> int:
    if cluster.state_file().exists():
        plane = cluster.Cluster.load_state(cluster.state_file()).plane
    elif kwok_state_file().exists():
        plane = controlplane.ControlPlane.load_state(kwok_state_file())
    else:
        print("no cluster is up; run `python -m devcluster up`", file=sys.stderr)
        return 1
    print("\n".join(_env_lines(plane)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "build", help="build (or reuse) the control plane and node binaries"
    ).set_defaults(run=_build)
    commands.add_parser(
        "image", help="build (or reuse) the relay image's OCI archive; prints its path"
    ).set_defaults(run=_image)
    up = commands.add_parser("up", help="start the cluster; prints shell exports")
    up.add_argument("--kwok", action="store_true", help="a fake kwok node instead of a real one")
    up.add_argument("--foreground", action="store_true", help="stay attached until Ctrl-C")
    up.set_defaults(run=_up)
    commands.add_parser("down", help="stop the cluster `up` started").set_defaults(run=_down)
    commands.add_parser("env", help="print KUBECONFIG/PATH exports").set_defaults(run=_env)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
