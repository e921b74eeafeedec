"""End-to-end relay throughput: smtp-source → (relay | Postfix) → smtp-sink, side by side.

``python -m bench.throughput [--messages 2000] [--sessions 20] [--size 2048] [--repeat 3]``

Each trial starts a fresh Postfix ``smtp-sink`` on 127.0.0.2 that exits after exactly N
messages, starts the system under test (our relay sending everything to the sink as its
gateway, or a private Postfix instance with the sink as ``relayhost``), then runs Postfix's
``smtp-source`` with S parallel sessions against it. The clock runs from launching
smtp-source until the sink has taken the Nth message. Trials alternate relay, Postfix, so
background load hits both alike; medians and spreads are printed with the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import baseline
from bench.postfix import Postfix
from bench.procs import TreeSampler, cpu_seconds, port_open
from bench.relay import Relay
from bench.report import filesystem, machine, median, revision, spread, table
from tests.peers import free_port, wait_for

SINK_HOST = "127.0.0.2"


@dataclass
class Trial:
    side: str
    messages: int
    delivered: int
    seconds: float  # first connection until the sink has the last message
    accept_seconds: float  # until smtp-source had its last 250
    peak_rss_kib: int
    peak_pss_kib: int
    cpu_seconds: float
    complete: bool

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


class Sink:
    """``smtp-sink`` that exits after ``count`` messages; ``-c`` counters go to a file."""

    def __init__(self, workdir: Path, count: int) -> None:
        self.port = free_port(SINK_HOST)
        self._out = workdir / "sink.out"
        with self._out.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *("smtp-sink", "-c", "-u", "postfix", "-M", str(count)),
                    *(f"{SINK_HOST}:{self.port}", "1000"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: port_open(SINK_HOST, self.port), timeout=10, what="smtp-sink")

    def received(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", self._out.read_bytes())
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def drive(args: argparse.Namespace, *, side: str, port: int, root: int, sink: Sink) -> Trial:
    """Run smtp-source against ``port``; wait (bounded) until the sink has every message."""
    cpu_before = cpu_seconds(root)
    with TreeSampler(root) as sampler:
        begin = time.monotonic()
        source = subprocess.Popen(
            [
                *("smtp-source", "-s", str(args.sessions), "-m", str(args.messages)),
                *("-l", str(args.size), "-f", "a@bench.test", "-t", "b@dest.test"),
                f"127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        accepted_at = None
        deadline = begin + args.timeout
        while sink.process.poll() is None and time.monotonic() < deadline:
            if accepted_at is None and source.poll() is not None:
                accepted_at = time.monotonic()
            time.sleep(0.002)
        end = time.monotonic()
        if source.poll() is None:
            source.terminate()
            source.wait(10)
        accepted_at = accepted_at or end
    complete = sink.process.poll() == 0
    return Trial(
        side=side,
        messages=args.messages,
        delivered=args.messages if complete else sink.received(),
        seconds=end - begin,
        accept_seconds=accepted_at - begin,
        peak_rss_kib=sampler.memory.peak_rss_kib,
        peak_pss_kib=sampler.memory.peak_pss_kib,
        cpu_seconds=cpu_seconds(root) - cpu_before,
        complete=complete,
    )


@contextlib.contextmanager
def scratch(parent: Path, prefix: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)  # Postfix's daemons run as the postfix user and must reach their queue
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def relay_trial(args: argparse.Namespace, workdir: Path, *, source: Path | None = None) -> Trial:
    sink = Sink(workdir, args.messages)
    wrap = None
    if args.py_spy:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        wrap = [py_spy, "record", "--nonblocking", "--subprocesses", "--rate", "200"]
        wrap += ["--format", "raw"]
        wrap += ["--output", str(args.py_spy), "--"]
    relay = Relay(
        workdir / "relay",
        {
            "gateway": {"host": f"{SINK_HOST}:{sink.port}", "sendAll": True},
            "delivery": {"concurrency": args.sessions, "queueTimer": "5m"},
            "logging": {"target": args.log_target},
        },
        wrap=wrap,
        source=source,
    )
    try:
        relay.start()
        side = "relay" if source is None else "baseline"
        return drive(args, side=side, port=relay.port, root=relay.pid, sink=sink)
    finally:
        relay.stop()
        sink.stop()


def postfix_trial(args: argparse.Namespace, workdir: Path) -> Trial:
    sink = Sink(workdir, args.messages)
    postfix = Postfix(workdir / "postfix", relayhost=f"[{SINK_HOST}]:{sink.port}")
    try:
        postfix.start()
        assert postfix.master_pid is not None
        return drive(args, side="postfix", port=postfix.port, root=postfix.master_pid, sink=sink)
    finally:
        postfix.stop()
        sink.stop()


def summarise(args: argparse.Namespace, trials: list[Trial]) -> str:
    relay = [t for t in trials if t.side == "relay"]
    before = [t for t in trials if t.side == "baseline"]
    postfix = [t for t in trials if t.side == "postfix"]
    rows = []
    names = {
        "baseline": f"relay before ({args.baseline_name})",
        "relay": "relay",
        "postfix": "postfix",
    }
    for name, group in (("baseline", before), ("relay", relay), ("postfix", postfix)):
        if not group:
            continue
        rows.append(
            [
                names[name],
                spread([t.rate for t in group]),
                spread([t.messages / t.accept_seconds for t in group]),
                spread([t.peak_rss_kib / 1024 for t in group], "{:.1f}"),
                spread([t.peak_pss_kib / 1024 for t in group], "{:.1f}"),
                spread([1000 * t.cpu_seconds / t.messages for t in group], "{:.2f}"),
                f"{sum(t.complete for t in group)}/{len(group)}",
            ]
        )
    out = [
        f"{args.messages} messages x {args.size} B, {args.sessions} sessions; "
        f"relay logging: {args.log_target}; {machine()}",
        f"spool/queue filesystem: {filesystem(args.workdir)}; relay at {revision()}",
        "",
        table(
            [
                "side",
                "end-to-end msgs/s",
                "accept msgs/s",
                "peak RSS MiB (sum)",
                "peak PSS MiB (sum)",
                "CPU ms/msg",
                "complete",
            ],
            rows,
        ),
    ]
    if relay and postfix:
        ratio = median([t.rate for t in relay]) / median([t.rate for t in postfix])
        out += ["", f"ratio relay/postfix (median end-to-end msgs/s): {ratio:.2f}"]
    if before and postfix:
        ratio = median([t.rate for t in before]) / median([t.rate for t in postfix])
        out += [f"ratio relay before/postfix: {ratio:.2f}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--messages", type=int, default=2000, help="messages a trial (2000)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    parser.add_argument("--size", type=int, default=2048, help="message body bytes (2048)")
    parser.add_argument("--repeat", type=int, default=3, help="trials per side (3)")
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit a trial (300 s)")
    parser.add_argument("--only", choices=["relay", "postfix"], help="run one side only")
    parser.add_argument(
        "--log-target", choices=["file", "none"], default="file", help="relay logging (file)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),  # noqa: S108 -- on disk, where /tmp is often tmpfs
        help="parent of the spools and queues; its filesystem is printed (/var/tmp)",
    )
    parser.add_argument("--keep", action="store_true", help="keep spools and logs")
    parser.add_argument("--json", type=Path, help="also write the trials here")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the relay of this git revision (before/after in one run)",
    )
    parser.add_argument(
        "--py-spy", type=Path, help="profile the relay with py-spy (raw stacks to this file)"
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.messages > 200_000 or args.repeat < 1 or args.repeat > 20:
        parser.error("--messages must be 1..200000 and --repeat 1..20")
    sides = [args.only] if args.only else ["relay", "postfix"]
    if args.baseline and args.only != "postfix":
        sides.insert(0, "baseline")
    if args.py_spy:
        sides, args.repeat = ["relay"], 1
    trials: list[Trial] = []
    with contextlib.ExitStack() as stack:
        source = None
        args.baseline_name = ""
        if "baseline" in sides:
            parent = stack.enter_context(scratch(args.workdir, "bench-baseline-src-", False))
            source = baseline.export(args.baseline, parent)
            args.baseline_name = baseline.short(args.baseline)
        run_rounds(args, sides, trials, source)
    print()
    print(summarise(args, trials))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(t) for t in trials], indent=1))
    return 0 if all(t.complete for t in trials) else 1


def run_rounds(
    args: argparse.Namespace, sides: list[str], trials: list[Trial], source: Path | None
) -> None:
    """Each round runs every side once, in turn, so background load hits them alike."""
    for round_ in range(args.repeat):
        for side in sides:
            with scratch(args.workdir, f"bench-{side}-", args.keep) as workdir:
                if side == "postfix":
                    trial = postfix_trial(args, workdir)
                else:
                    trial = relay_trial(
                        args, workdir, source=source if side == "baseline" else None
                    )
            trials.append(trial)
            print(
                f"round {round_ + 1} {side:7} {trial.rate:7.0f} msgs/s end to end, "
                f"accepted in {trial.accept_seconds:.2f}s, delivered {trial.delivered}"
                f"/{trial.messages} in {trial.seconds:.2f}s, peak RSS "
                f"{trial.peak_rss_kib / 1024:.1f} MiB, CPU {trial.cpu_seconds:.2f}s",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
