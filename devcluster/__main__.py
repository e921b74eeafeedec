"""`python -m devcluster build|image|up|down|env` — the local cluster, for humans and CI.

`up` starts the cluster in the background and records it in a state file; `down` stops
what that file names, by PID. `up --foreground` instead stays attached until Ctrl-C.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from devcluster import build, controlplane, image


def state_file() -> Path:
    return build.bin_dir().parent / "current.json"


def _env_lines(plane: controlplane.ControlPlane) -> list[str]:
    return [
        f"export KUBECONFIG={shlex.quote(str(plane.kubeconfig))}",
        f"export PATH={shlex.quote(str(plane.bin_dir))}:$PATH",
    ]


def _build(_: argparse.Namespace) -> int:
    return build.main()


def _image(_: argparse.Namespace) -> int:
    return image.main()


def _up(args: argparse.Namespace) -> int:
    if state_file().exists():
        print(f"a control plane is already up ({state_file()}); run `down` first", file=sys.stderr)
        return 1
    try:
        plane = controlplane.start(bin_dir=build.ensure_built())
    except (build.BuildError, controlplane.StartError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"control plane up at {plane.server}; logs in {plane.run_dir / 'logs'}", file=sys.stderr)
    if not args.foreground:
        plane.save_state(state_file())
        print("\n".join(_env_lines(plane)))
        return 0
    print("\n".join(_env_lines(plane)), file=sys.stderr)
    print("Ctrl-C stops it.", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        plane.stop()
    return 0


def _down(_: argparse.Namespace) -> int:
    path = state_file()
    if not path.exists():
        print("no control plane is up", file=sys.stderr)
        return 0
    controlplane.ControlPlane.load_state(path).stop()
    path.unlink()
    print("control plane stopped", file=sys.stderr)
    return 0


def _env(_: argparse.Namespace) -> int:
    path = state_file()
    if not path.exists():
        print("no control plane is up; run `python -m devcluster up`", file=sys.stderr)
        return 1
    print("\n".join(_env_lines(controlplane.ControlPlane.load_state(path))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build (or reuse) the cached binaries").set_defaults(
        run=_build
    )
    commands.add_parser(
        "image", help="build (or reuse) the relay image's OCI archive; prints its path"
    ).set_defaults(run=_image)
    up = commands.add_parser("up", help="start a control plane; prints shell exports")
    up.add_argument("--foreground", action="store_true", help="stay attached until Ctrl-C")
    up.set_defaults(run=_up)
    commands.add_parser("down", help="stop the control plane `up` started").set_defaults(run=_down)
    commands.add_parser("env", help="print KUBECONFIG/PATH exports").set_defaults(run=_env)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
