"""Where the relay's time goes: a py-spy raw profile rolled up by stage and by kind of work.

``python -m bench.throughput --messages 2000 --py-spy /tmp/relay.txt`` records one; then
``python -m bench.profile /tmp/relay.txt [--messages 2000]`` prints the shares (and, given
the message count and the CPU the bench printed, milliseconds per message). py-spy counts
a thread as busy in a syscall (fsync, send) too, so this is wall time of non-idle threads,
close to but not exactly CPU.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

# (substring of a frame, label); frames are searched from the leaf towards the root.
KINDS = [
    ("load_default_certs", "TLS: SSLContext built per delivery (CA bundle load)"),
    ("create_default_context", "TLS: SSLContext built per delivery (CA bundle load)"),
    ("_fsync_dir", "fsync of the queue directory"),
    ("_write_durably", "write + fsync of message/state files"),
    ("Spool.locked", "flock open/close (inode freed at close after unlink)"),
    ("Spool.remove", "unlink after delivery"),
    ("json/", "JSON encode/decode"),
    ("structlog/", "logging (structlog + sinks)"),
    ("smtprelay/logs.py", "logging (structlog + sinks)"),
    ("email/", "email header parsing/formatting"),
    ("importlib", "imports (start-up)"),
    ("concurrent/futures/thread.py", "thread hops (to_thread, executor wake-ups)"),
    ("asyncio/threads.py", "thread hops (to_thread, executor wake-ups)"),
    ("run_in_executor", "thread hops (to_thread, executor wake-ups)"),
    ("_write_to_self", "thread hops (to_thread, executor wake-ups)"),
    ("_read_from_self", "thread hops (to_thread, executor wake-ups)"),
    ("sock_connect", "socket connect/accept/close"),
    ("_accept_connection", "socket connect/accept/close"),
    ("_real_close", "socket connect/accept/close"),
    ("_call_connection_lost", "socket connect/accept/close"),
    ("Transport.write", "socket send"),
    ("_read_ready", "socket receive"),
    ("selectors.py", "event loop (epoll, scheduling)"),
    ("asyncio/", "event loop (epoll, scheduling)"),
    ("aiosmtpd/", "aiosmtpd protocol (parsing, replies, per-session setup)"),
    ("aiosmtplib/", "aiosmtplib client protocol"),
    ("inspect.py", "aiosmtpd protocol (parsing, replies, per-session setup)"),
]
STAGES = [
    ("Scheduler.", "deliver (schedule/deliver)"),
    ("smtprelay/deliver.py", "deliver (schedule/deliver)"),
    ("aiosmtplib/", "deliver (schedule/deliver)"),
    ("_GroupSync", "receive (SMTP in, spool)"),
    ("Spool.enqueue", "receive (SMTP in, spool)"),
    ("aiosmtpd/", "receive (SMTP in, spool)"),
    ("smtprelay/receive.py", "receive (SMTP in, spool)"),
    ("_accept_connection", "receive (SMTP in, spool)"),
    ("serve_http", "metrics/readiness"),
    ("importlib", "start-up"),
    ("_WorkItem.run", "spool file I/O in worker threads"),
    ("concurrent/futures/thread.py", "worker threads waking/idle"),
    ("BaseEventLoop._run_once", "event loop itself"),
]


def _first(frames: list[str], rules: list[tuple[str, str]], default: str) -> str:
    for frame in frames:
        for needle, label in rules:
            if needle in frame:
                return label
    return default


def rollup(path: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    kinds: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        leaf_first = frames[::-1]
        kinds[_first(leaf_first, KINDS, "other Python")] += samples
        stages[_first(leaf_first, STAGES, "other")] += samples
        total += samples
    return total, kinds, stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("profile", type=Path, help="py-spy --format raw output")
    parser.add_argument("--messages", type=int, help="messages in the profiled run")
    parser.add_argument("--cpu", type=float, help="relay CPU seconds the bench printed")
    args = parser.parse_args(argv)
    total, kinds, stages = rollup(args.profile)
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    per_message = (
        1000 * args.cpu / args.messages if args.cpu is not None and args.messages else None
    )
    for title, counter in (("by kind of work", kinds), ("by stage", stages)):
        print(f"{title} ({total} samples)")
        for label, samples in counter.most_common():
            share = samples / total
            extra = f"  ~{share * per_message:.2f} ms/msg" if per_message else ""
            print(f"  {share:6.1%}  {label}{extra}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
