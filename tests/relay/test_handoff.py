"""The inotify events workers hand messages over by: parsed whole, overflow noticed."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from smtprelay import handoff
from smtprelay.config import MailSettings
from smtprelay.route import MxResolver
from smtprelay.schedule import Scheduler, Setup
from smtprelay.spool import Spool


def _event(name: bytes, mask: int = handoff.IN_MOVED_TO) -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""
    return struct.pack("iIII", 1, mask, 0, len(padded)) + padded


def test_events_are_parsed_and_a_torn_tail_is_left() -> None:
    buffer = _event(b"0000000000aabbccddeeff.eml") + _event(b"", handoff.IN_Q_OVERFLOW)
    names, overflow = handoff.parse_events(buffer + _event(b"torn.eml")[:20])
    assert names == ["0000000000aabbccddeeff.eml"]
    assert overflow


def test_hostile_bytes_do_not_crash_the_parser() -> None:
    """A length pointing past the buffer, a huge length, garbage: nothing invented."""
    for buffer in (
        struct.pack("iIII", 1, handoff.IN_MOVED_TO, 0, 1 << 31),
        b"\xff" * 15,
        struct.pack("iIII", 1, handoff.IN_MOVED_TO, 0, 8) + b"\xff\xfe\0\0\0\0\0\0",
    ):
        names, overflow = handoff.parse_events(buffer)
        assert not overflow
        assert all(isinstance(name, str) for name in names)


def test_a_lost_event_makes_the_worker_rescan(tmp_path: Path) -> None:
    """When the kernel's event queue overflows, the messages it did not announce are
    scheduled all the same. A real overflow needs fs.inotify.max_queued_events lowered
    host-wide, so the overflow event is written into a pipe the watch reads instead."""
    spool = Spool(tmp_path)
    setup = Setup(settings=MailSettings(), hostname="relay.test", resolver=MxResolver([]))
    scheduler = Scheduler(spool=spool, setup=lambda: setup)

    async def scenario() -> int:
        queued = await spool.enqueue(sender="a@x.test", recipients=("b@y.test",), data=b"x\r\n")
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.write(write_end, _event(b"", handoff.IN_Q_OVERFLOW))
        watch = handoff.attach(read_end, arrived=scheduler.arrived, overflowed=scheduler.rescan)
        os.close(write_end)
        watch.close()
        assert queued.id
        return scheduler.queued

    assert asyncio.run(scenario()) == 1
