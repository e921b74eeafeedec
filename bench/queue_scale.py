"""Queue scale: a spool of N deferred messages, the relay beside Postfix with the same queue.

``python -m bench.queue_scale [--messages 20000] [--repeat 3]`` (``--messages 100000`` is
the design's target; filling Postfix's queue through smtpd takes minutes at that size).

Relay: the spool is filled directly through ``smtprelay.spool.Spool`` (``enqueue`` and
``defer``, as a message after one failed attempt, due in an hour) with fsync switched
off in this process only, then one ``sync(2)``. Then, with the gateway a closed port and a
1 h queue timer, it measures ``smtprelay queue list`` (the relay's mailq), ``smtprelay
serve`` start-up until ``/readyz`` is 200 and memory after start (each ``--repeat`` times), and once
the queue run after ``smtprelay queue flush`` until every message has been attempted and
deferred, bounded by ``--run-timeout``.

Postfix: N messages are sent through smtpd (smtp-source, 20 sessions) with the relayhost a
closed port, so each is tried once and deferred, like the relay's spool. Then ``postqueue
-p`` (mailq), ``postfix start`` until smtpd answers and memory after start (each
``--repeat`` times), and once ``postqueue -f`` (the same flush) until every message has been
tried again (``status=deferred`` lines).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from smtprelay.spool import QueueState, Spool

from bench import baseline
from bench.postfix import Postfix
from bench.procs import TreeSampler, cpu_seconds
from bench.relay import Relay
from bench.report import filesystem, machine, median, revision, spread, table
from bench.throughput import scratch
from tests.peers import free_port, wait_for

CLOSED_HOST = "127.0.0.2"
BODY = b"Subject: queue scale\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26  # about 2 KiB


@dataclass
class Side:
    side: str
    messages: int
    fill_seconds: float = 0.0
    list_seconds: list[float] = field(default_factory=list)
    listed: int = 0
    start_seconds: list[float] = field(default_factory=list)
    start_pss_kib: list[int] = field(default_factory=list)
    run_seconds: list[float] = field(default_factory=list)
    run_attempted: list[int] = field(default_factory=list)
    run_peak_pss_kib: list[int] = field(default_factory=list)
    idle_cpu_percent: list[float] = field(default_factory=list)


async def _fill(spool: Spool, count: int, due: float) -> None:
    batch = 500
    for first in range(0, count, batch):
        envelopes = await asyncio.gather(
            *(
                spool.enqueue(sender="a@bench.test", recipients=("b@dest.test",), data=BODY)
                for _ in range(min(batch, count - first))
            )
        )
        for envelope in envelopes:
            spool.defer(envelope.id, QueueState(attempts=1), due)


def fill_spool(root: Path, count: int) -> float:
    """N deferred messages through the spool's own API; fsync off here only, then sync(2)."""
    begin = time.monotonic()
    with mock.patch.object(os, "fsync", return_value=None):
        asyncio.run(_fill(Spool(root), count, time.time() + 3600))
    os.sync()
    return time.monotonic() - begin


def idle_cpu(root: int, seconds: float = 5.0) -> float:
    """Percent of one core the tree uses while nothing is due."""
    before = cpu_seconds(root)
    time.sleep(seconds)
    return 100 * (cpu_seconds(root) - before) / seconds


def measure_relay(args: argparse.Namespace, workdir: Path, *, source: Path | None = None) -> Side:
    result = Side("relay" if source is None else "relay before", args.messages)
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    spool = workdir / "relay" / "spool"
    result.fill_seconds = fill_spool(spool, args.messages)
    print(f"relay: filled the spool with {args.messages} in {result.fill_seconds:.1f}s", flush=True)
    closed = free_port(CLOSED_HOST)
    config = {
        "gateway": {"host": f"{CLOSED_HOST}:{closed}", "sendAll": True},
        "delivery": {"queueTimer": "1h", "tries": 1000},
        "logging": {"target": args.log_target},
    }
    for round_ in range(args.repeat):
        begin = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "smtprelay", "queue", "--spool", str(spool), "list"],
            env=env,
            check=True,
            capture_output=True,
            timeout=args.timeout,
        ).stdout
        result.list_seconds.append(time.monotonic() - begin)
        result.listed = sum(1 for line in out.splitlines()[1:] if line[:1].isalnum())
        relay = Relay(workdir / "relay", config, source=source)
        attempted = 0.0
        try:
            started = relay.start(timeout=args.timeout)
            with TreeSampler(relay.pid) as sampler:
                sampler.sample()
                result.start_seconds.append(started)
                result.start_pss_kib.append(sampler.memory.last_pss_kib)
                if round_ + 1 < args.repeat:
                    continue  # the queue run, the slow part, is measured once: last round
                begin = time.monotonic()
                subprocess.run(  # like postqueue -f: every message due now
                    [sys.executable, "-m", "smtprelay", "queue", "--spool", str(spool), "flush"],
                    env=env,
                    check=True,
                    capture_output=True,
                    timeout=args.timeout,
                )
                deadline = begin + args.run_timeout
                while attempted < args.messages and time.monotonic() < deadline:
                    time.sleep(0.25)
                    attempted = relay.counter("smtprelay_delivery_attempts")
                result.run_seconds.append(time.monotonic() - begin)
                result.run_attempted.append(int(attempted))
            result.run_peak_pss_kib.append(sampler.memory.peak_pss_kib)
            result.idle_cpu_percent.append(idle_cpu(relay.pid))
        finally:
            relay.stop()
            print(
                f"relay round {round_ + 1}: queue list {result.list_seconds[-1]:.2f}s, ready "
                f"in {result.start_seconds[-1]:.2f}s, queue run {int(attempted)}/"
                f"{args.messages}",
                flush=True,
            )
    return result


class _LogCounter:
    """Counts new ``status=deferred`` lines in Postfix's maillog, reading only what was added."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self.count = 0

    def poll(self) -> int:
        with contextlib.suppress(FileNotFoundError), self._path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            end = chunk.rfind(b"\n") + 1
            self.count += chunk[:end].count(b"status=deferred")
            self._offset += end
        return self.count


def measure_postfix(args: argparse.Namespace, workdir: Path) -> Side:
    result = Side("postfix", args.messages)
    closed = free_port(CLOSED_HOST)
    postfix = Postfix(workdir / "postfix", relayhost=f"[{CLOSED_HOST}]:{closed}")
    try:
        postfix.start()
        begin = time.monotonic()
        subprocess.run(
            [
                *("smtp-source", "-s", "20", "-m", str(args.messages), "-l", "2048"),
                *("-f", "a@bench.test", "-t", "b@dest.test", f"127.0.0.1:{postfix.port}"),
            ],
            check=True,
            timeout=args.timeout,
            stdout=subprocess.DEVNULL,
        )
        wait_for(
            lambda: (
                postfix.queued("deferred") >= args.messages
                and postfix.queued("incoming", "active") == 0
            ),
            timeout=args.timeout,
            interval=0.5,
            what="Postfix to defer every message",
        )
        result.fill_seconds = time.monotonic() - begin
        print(
            f"postfix: deferred {args.messages} via smtpd in {result.fill_seconds:.1f}s",
            flush=True,
        )
        for round_ in range(args.repeat):
            seconds, result.listed = postfix.postqueue_list()
            result.list_seconds.append(seconds)
            postfix.stop()
            started = postfix.start()
            assert postfix.master_pid is not None
            result.start_seconds.append(started)
            counter = _LogCounter(postfix.maillog)
            with TreeSampler(postfix.master_pid) as sampler:
                sampler.sample()
                result.start_pss_kib.append(sampler.memory.last_pss_kib)
                if round_ + 1 == args.repeat:
                    begin = time.monotonic()
                    subprocess.run(["postqueue", "-c", str(postfix.conf), "-f"], check=True)
                    deadline = begin + args.run_timeout
                    while counter.poll() < args.messages and time.monotonic() < deadline:
                        time.sleep(0.25)
                    result.run_seconds.append(time.monotonic() - begin)
                    result.run_attempted.append(counter.count)
                    wait_for(
                        lambda: postfix.queued("incoming", "active") == 0,
                        timeout=args.run_timeout,
                        interval=0.25,
                        what="Postfix's active queue to drain",
                    )
            if round_ + 1 == args.repeat:
                result.run_peak_pss_kib.append(sampler.memory.peak_pss_kib)
                result.idle_cpu_percent.append(idle_cpu(postfix.master_pid))
            print(
                f"postfix round {round_ + 1}: postqueue -p {seconds:.2f}s, smtpd up in "
                f"{started:.2f}s, flush {counter.count}/{args.messages}",
                flush=True,
            )
    finally:
        postfix.stop()
    return result


def summarise(args: argparse.Namespace, sides: list[Side]) -> str:
    rows = []
    for s in sides:
        rows.append(
            [
                s.side,
                f"{s.fill_seconds:.1f}",
                f"{spread(s.list_seconds, '{:.2f}')} ({s.listed} listed)",
                spread(s.start_seconds, "{:.2f}"),
                spread([k / 1024 for k in s.start_pss_kib], "{:.1f}"),
                f"{spread(s.run_seconds, '{:.1f}')} ({min(s.run_attempted, default=0)} tried)",
                spread([k / 1024 for k in s.run_peak_pss_kib], "{:.1f}"),
                spread(s.idle_cpu_percent, "{:.1f}"),
            ]
        )
    out = [
        f"{args.messages} deferred messages of ~2 KiB; relay logging: {args.log_target}; "
        f"{machine()}",
        f"spool/queue filesystem: {filesystem(args.workdir)}; relay at {revision()}",
        "",
        table(
            [
                "side",
                "fill s",
                "mailq s (relay: queue list)",
                "start until ready s",
                "PSS after start MiB",
                "queue run s (relay: queue flush; postfix: postqueue -f)",
                "peak PSS in run MiB",
                "idle CPU % after",
            ],
            rows,
        ),
    ]
    by_side = {s.side: s for s in sides}
    if "relay" in by_side and "postfix" in by_side:
        relay, postfix = by_side["relay"], by_side["postfix"]
        ratio = median(relay.list_seconds) / median(postfix.list_seconds)
        out.append(f"mailq time ratio relay/postfix: {ratio:.2f}")
        if relay.run_seconds and postfix.run_seconds:
            rates = [side.run_attempted[0] / side.run_seconds[0] for side in (relay, postfix)]
            out.append(
                f"queue run, messages tried a second: relay {rates[0]:.0f}, postfix "
                f"{rates[1]:.0f}, ratio relay/postfix {rates[0] / rates[1]:.3f}"
            )
        before = by_side.get("relay before")
        if before is not None and before.run_seconds and postfix.run_seconds:
            rate = before.run_attempted[0] / before.run_seconds[0]
            theirs = postfix.run_attempted[0] / postfix.run_seconds[0]
            list_ratio = median(before.list_seconds) / median(postfix.list_seconds)
            out.append(
                f"relay before: mailq time ratio {list_ratio:.2f}; queue run {rate:.0f} a "
                f"second, ratio {rate / theirs:.3f}"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_scale", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="queue length (20000)")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per side (3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="limit per step (900 s)")
    parser.add_argument(
        "--run-timeout", type=float, default=600.0, help="limit on the queue run (600 s)"
    )
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
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--baseline", metavar="REV", help="also measure the relay of this git revision first"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 200_000 or not 1 <= args.repeat <= 20:
        parser.error("--messages must be 1..200000 and --repeat 1..20")
    names = [args.only] if args.only else ["relay", "postfix"]
    if args.baseline and args.only != "postfix":
        names.insert(0, "baseline")
    sides: list[Side] = []
    for side in names:
        with scratch(args.workdir, f"bench-queue-{side}-", args.keep) as workdir:
            if side == "postfix":
                sides.append(measure_postfix(args, workdir))
            elif side == "relay":
                sides.append(measure_relay(args, workdir))
            else:
                source = baseline.export(args.baseline, workdir / "source")
                sides.append(measure_relay(args, workdir, source=source))
    print()
    print(summarise(args, sides))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(s) for s in sides], indent=1))
    return 0 if all(min(s.run_attempted, default=0) >= s.messages for s in sides) else 1


if __name__ == "__main__":
    sys.exit(main())
