"""``smtprelay``: serve, check-config, queue administration, hash-password."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

TYPE_CHECKING = False  # typing itself costs `queue list` ~5 ms of start-up
if TYPE_CHECKING:
    import argparse

    from smtprelay.config import RelayConfig

# Settings (pydantic), password hashing, the spool's writer (asyncio, threads), the server
# and argparse are imported by the commands that use them: `queue list` is run by hand and
# by scripts, and should start at once (it needs mailq.py, forkmerge.py and queuelayout.py).


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog="smtprelay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the relay until SIGTERM")
    serve.add_argument("--config", type=Path, required=True, help="path to relay.yaml")
    # Where the process listens and spools, overriding relay.yaml (e.g. to run a pod's file
    # elsewhere); the config hash stays that of the file, and a reload keeps the overrides.
    serve.add_argument("--listen", help="SMTP address, instead of relay.yaml's listen")
    serve.add_argument("--metrics-listen", help="instead of relay.yaml's metricsListen")
    serve.add_argument("--spool-dir", help="instead of relay.yaml's spoolDir")

    check = commands.add_parser("check-config", help="validate relay.yaml and exit")
    check.add_argument("--config", type=Path, required=True, help="path to relay.yaml")

    hashing = commands.add_parser(
        "hash-password",
        help="print a password hash for auth.usersFile (reads the password from stdin)",
    )
    hashing.add_argument("--user", help="print a 'user: hash' line ready for the users file")

    queue = commands.add_parser("queue", help="inspect and manage the spool")
    where = queue.add_mutually_exclusive_group(required=True)
    where.add_argument("--spool", type=Path, help="the spool directory")
    where.add_argument("--config", type=Path, help="relay.yaml naming the spool directory")
    actions = queue.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every queued message (like mailq)")
    actions.add_parser("flush", help="attempt every message now (like postqueue -f)")
    for name, text in (
        ("show", "a message's envelope, state and content"),
        ("delete", "remove a message without notice (like postsuper -d)"),
        ("bounce", "fail a message and return it to its sender"),
    ):
        actions.add_parser(name, help=text).add_argument("id", help="queue id")
    return parser


def _load(path: Path) -> RelayConfig | None:
    from smtprelay.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return None


def _queue(args: argparse.Namespace) -> int:
    hostname = None
    if args.config is not None:
        config = _load(args.config)
        if config is None:
            return 1
        spool_dir, hostname = config.spool_dir, config.hostname
    else:
        spool_dir = args.spool
    if not _is_spool(spool_dir):
        return 1
    if args.action == "list":
        return _list(spool_dir)
    import socket
    import time

    from smtprelay import admin
    from smtprelay.spool import Busy, Spool

    spool = Spool(spool_dir)
    if args.action == "flush":
        count, pid = admin.flush(spool)
        relay = f"relay (pid {pid}) notified" if pid else "no running relay found"
        print(f"{count} message(s) due now; {relay}")
        return 0
    if not spool.contains(args.id):
        print(f"smtprelay queue {args.action}: no message {args.id} in the queue", file=sys.stderr)
        return 1
    if args.action == "show":
        sys.stdout.write(admin.show(spool, args.id))
        return 0
    try:
        if args.action == "delete":
            done = admin.delete(spool, args.id)
        else:
            done = admin.bounce_message(
                spool, args.id, hostname=hostname or socket.getfqdn(), now=time.time()
            )
    except Busy:
        print(
            f"smtprelay queue {args.action}: {args.id} is still being delivered after "
            f"{admin.LOCK_WAIT:.0f}s; try again",
            file=sys.stderr,
        )
        return 1
    print(f"{args.id}: {args.action}d" if done else f"{args.id}: already gone")
    return 0 if done else 1


def _is_spool(spool_dir: Path) -> bool:
    if spool_dir.is_dir():
        return True
    print(f"smtprelay queue: {spool_dir} is not a spool directory", file=sys.stderr)
    return False


def _plain_list(line: list[str]) -> Path | None:
    """The spool of ``queue --spool DIR list``, the form people and scripts type most,
    recognised without building the parser: argparse, with the gettext, locale and shutil
    it imports, is ~15 ms of the listing's start (a tenth of `queue list` with 1,000
    queued). Any other command line, errors and ``--help`` included, goes to argparse."""
    plain = len(line) == 4 and line[:2] == ["queue", "--spool"] and line[3] == "list"
    if plain and line[2][:1] not in ("", "-"):  # argparse reads "-x" as an option
        return Path(line[2])
    return None


def _list(spool_dir: Path) -> int:
    from smtprelay import mailq

    if isinstance(sys.stdout, io.TextIOWrapper):  # an address in a locale's charset or not
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        mailq.write(spool_dir, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `queue list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except OSError as error:  # queue/ or state/ unreadable: not a row, the whole listing
        print(f"smtprelay queue list: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("smtprelay hash-password: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("smtprelay hash-password: empty password", file=sys.stderr)
        return 1
    from smtprelay.auth import hash_password

    encoded = hash_password(password)
    print(f"{args.user}: '{encoded}'" if args.user else encoded)
    return 0


def main(argv: list[str] | None = None) -> int:
    if (spool_dir := _plain_list(sys.argv[1:] if argv is None else argv)) is not None:
        return _list(spool_dir) if _is_spool(spool_dir) else 1
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        return _hash_password(args)
    if args.command == "check-config":
        config = _load(args.config)
        if config is None:
            return 1
        print(f"{args.config}: ok")
        return 0
    if args.command == "serve":
        from smtprelay import reload, service, workers  # only needed to serve
        from smtprelay.config import ConfigError

        overrides = {
            key: value
            for key, value in (
                ("listen", args.listen),
                ("metricsListen", args.metrics_listen),
                ("spoolDir", args.spool_dir),
            )
            if value is not None
        }
        try:
            loaded = reload.load(args.config, overrides)
        except ConfigError as error:
            for problem in error.problems:
                print(f"{args.config}: {problem}", file=sys.stderr)
            return 1
        try:
            return workers.serve(loaded.config, (args.config, loaded, overrides))
        except service.StartError:
            return 1  # already logged, naming the file or setting
    return _queue(args)


if __name__ == "__main__":
    sys.exit(main())
