"""The spool's names and limits on disk, and the two reads every reader needs: which
messages are queued, and a queue file's envelope line.

Kept apart from queuefiles.py (state files, locks, removal) so that ``queue list``, run by
hand against a queue of any length, imports ``os`` and ``re`` and nothing else of the
relay's: no dataclasses, no pathlib.
"""

from __future__ import annotations

import os
import re

QUEUE = "queue"
STATE = "state"
CORRUPT = "corrupt"
SUFFIX = ".eml"
MAX_ENVELOPE = 1024 * 1024  # 1000 recipients of 256 octets, with room
MAX_STATE = 1024 * 1024  # as many settled recipients
_ID = re.compile(r"[0-9a-f]{21}")  # new_queue_id's shape; anything else is not ours
_FILE = re.compile(r"[0-9a-f]{21}\.eml").fullmatch  # a queue file's name


def is_queue_id(name: str) -> bool:
    return _ID.fullmatch(name) is not None


def is_queue_file(name: str) -> bool:
    return _FILE(name) is not None


def queued_ids(queue_dir: str) -> list[str]:
    """Every queued message id, in arrival order (ids begin with their arrival time). One
    listing; what it keeps is the list it returns."""
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return []  # a spool no relay has used yet
    ids = [name[: -len(SUFFIX)] for name in names if _FILE(name)]
    ids.sort()
    return ids


def envelope_line(fd: int) -> tuple[bytes, int]:
    """A queue file's first line (its envelope, up to `MAX_ENVELOPE` octets) and the offset
    of the message after it, read with ``pread`` from the start whatever the offset."""
    head = os.pread(fd, 4096, 0)
    while b"\n" not in head and len(head) < MAX_ENVELOPE:  # an envelope of many recipients
        more = os.pread(fd, 65536, len(head))
        if not more:
            break
        head += more
    line, newline, _ = head.partition(b"\n")
    return line, len(line) + len(newline)
