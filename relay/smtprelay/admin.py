"""Queue administration, as ``postqueue -f``, ``postsuper -d`` and ``postcat`` for Postfix
(``mailq``: mailq.py).

These work on the spool directory, next to a running relay: ``flush`` asks the relay (by the
PID in the spool) to try everything now. ``delete`` and ``bounce`` first take the message's
lock, which the relay holds for the whole of a delivery attempt: an attempt in flight is
waited for (up to ``LOCK_WAIT`` seconds), and one not yet started finds the message gone. So
a queue command never makes a message go out twice, and never loses one: a recipient the
attempt delivered is not bounced, and a message the attempt finished is "already gone".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from smtprelay.spool import PID_FILE, Busy, Spool

LOCK_WAIT = 90.0  # longer than one delivery attempt usually takes


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def show(spool: Spool, queue_id: str) -> str:
    envelope, data = spool.read(queue_id)
    state = spool.load_state(queue_id)
    lines = [
        f"id: {envelope.id}",
        f"arrived: {_stamp(envelope.received)} UTC",
        f"client: {envelope.client}",
        f"sender: {envelope.sender or '<>'}",
        f"attempts: {state.attempts}",
        f"next attempt: {_stamp(spool.due(queue_id))} UTC",
    ]
    for recipient in envelope.recipients:
        status = (
            "delivered"
            if recipient in state.delivered
            else "failed"
            if recipient in state.failed
            else "pending"
        )
        lines.append(f"recipient: {recipient} ({status})")
    lines += ["", data.decode("utf-8", "replace")]
    return "\n".join(lines)


def signal_relay(spool: Spool) -> int | None:
    """SIGUSR1 to the relay serving this spool: make every message due now."""
    try:
        pid = int((spool.root / PID_FILE).read_text().strip())
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError):
        return None
    return pid


def flush(spool: Spool) -> tuple[int, int | None]:
    """Every message due now. A running relay is told (as ``postqueue -f`` tells qmgr) and
    takes every message of its spool into its schedule as due, without a file being
    touched; with no relay running, each message is marked due on disk for the next start
    (a message in the middle of an attempt is left to it)."""
    pid = signal_relay(spool)
    if pid is not None:
        return spool.census()[0], pid
    count = 0
    for queue_id in spool.ids():
        with contextlib.suppress(Busy), spool.locked(queue_id) as present:
            if present:
                spool.reschedule(queue_id, time.time())
                count += 1
    return count, None


def delete(spool: Spool, queue_id: str, *, wait: float = LOCK_WAIT) -> bool:
    """Remove a message; False if it was already gone. Raises `Busy` after ``wait``."""
    with spool.locked(queue_id, timeout=wait) as present:
        return present and spool.remove(queue_id, durable=True)


def bounce_message(
    spool: Spool, queue_id: str, *, hostname: str, now: float, wait: float = LOCK_WAIT
) -> bool:
    """Fail every pending recipient and return the message to its sender."""
    from smtprelay import bounce  # email.mime: only this command needs it

    with spool.locked(queue_id, timeout=wait) as present:
        if not present:
            return False  # the relay finished it meanwhile
        envelope, data = spool.read(queue_id)
        pending = spool.load_state(queue_id).pending(envelope)
        if envelope.sender and pending:
            failures = [
                bounce.Failure(recipient, "5.0.0", "returned to sender by the administrator")
                for recipient in pending
            ]
            report = bounce.build_report(
                queue_id=queue_id,
                sender=envelope.sender,
                failures=failures,
                headers=bounce.original_headers(data),
                hostname=hostname,
                arrival=envelope.received,
                now=now,
            )
            # the report is durable before the message goes: a crash between the two at worst
            # leaves both, never neither
            asyncio.run(
                spool.enqueue(sender="", recipients=(envelope.sender,), data=report, client="admin")
            )
        spool.remove(queue_id, durable=True)
    if envelope.sender and pending:
        signal_relay(spool)
    return True
