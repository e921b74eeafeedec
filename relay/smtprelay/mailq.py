"""``smtprelay queue list``: every queued message, as ``mailq`` (``postqueue -p``) shows them.

Run by hand and by scripts against a queue of any length, so it costs what reading the
files costs and little more: one listing of ``queue/`` and of ``state/``, then per message
one read of its queue file's head (the envelope line) and, when there is one, of its state
file; plain JSON decoding, no envelope objects. Imports nothing heavier than ``json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from smtprelay.queuefiles import SUFFIX, QueueFiles, envelope_line

_decode = json.JSONDecoder().raw_decode  # from a str, without json.loads' layers
_NOTHING = {"attempts": 0, "delivered": (), "failed": ()}
HEADER = f"{'Queue ID':<22} {'Size':>8} {'Arrived (UTC)':<19} {'Tries':>5}  Sender / Recipients"
_INDENT = " " * 59


def lines(files: QueueFiles) -> Iterator[str]:
    """The listing, line by line (each with its newline), oldest message first."""
    with_state = files.state_ids()
    count = 0
    stamp = _Stamp()
    for queue_id in files.ids():
        try:
            head, size = _head(files, queue_id)
        except FileNotFoundError:
            continue  # delivered while we looked
        state: Any = _NOTHING
        if queue_id in with_state:
            with contextlib.suppress(OSError, ValueError):  # torn or gone: nothing recorded
                state = _decode(files.state_bytes(queue_id).decode())[0]
        if count == 0:
            yield HEADER + "\n"
        count += 1
        yield _row(queue_id, size, head, state, stamp)
    yield f"-- {count} message(s)\n" if count else "Mail queue is empty\n"


def _head(files: QueueFiles, queue_id: str) -> tuple[dict[str, Any] | None, int]:
    """The decoded envelope line (None when unreadable) and the queue file's size."""
    fd = os.open(f"{files.queue_dir}/{queue_id}{SUFFIX}", os.O_RDONLY)
    try:
        line, _ = envelope_line(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    try:
        head = _decode(line.decode())[0]
    except ValueError:  # UnicodeDecodeError too
        return None, size
    return head if isinstance(head, dict) else None, size


def _row(queue_id: str, size: int, head: dict[str, Any] | None, state: Any, stamp: _Stamp) -> str:
    try:
        attempts = int(state["attempts"])
        settled = set()
        if state["delivered"] or state["failed"]:
            settled = set(state["delivered"]) | set(state["failed"])
    except (KeyError, TypeError, ValueError):
        attempts, settled = 0, set()
    unreadable = f"{queue_id:<22} {size:>8} {'?':<19} {attempts:>5}  (unreadable envelope)\n"
    if head is None:
        return unreadable
    try:
        arrived = stamp(float(head["received"]))
        sender = str(head["sender"]) or "<>"
        pending = [r for r in head["recipients"] if r not in settled]
    except (KeyError, TypeError, ValueError, OverflowError):
        return unreadable
    row = f"{queue_id:<22} {size:>8} {arrived:<19} {attempts:>5}  {sender}\n"
    if pending:
        row += "".join(f"{_INDENT}{recipient}\n" for recipient in pending)
    return row


class _Stamp:
    """``YYYY-mm-dd HH:MM:SS`` of a time, computed once per second of arrival."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, seconds: float) -> str:
        second = int(seconds)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return self._text
