"""Log To: day files, stdout, RFC 5424 syslog, none; canonical mail lines; system events on stdout."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from smtprelay.logs import DayFileSink, day_file_name

from tests.peers import Relay, Sink, SyslogReceiver, Zone, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)) "
    r"(?P<host>\S+) smtprelay (?P<pid>\d+) (?P<msgid>\S+) - (?P<msg>\{.*\})$"
)


def _at(year: int, month: int, day: int, hour: int = 12) -> float:
    return dt.datetime(year, month, day, hour, tzinfo=dt.UTC).timestamp()


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class TestDayFileSink:
    def test_each_day_gets_its_own_file(self, tmp_path: Path) -> None:
        """Events go to sysMMDD.txt of the clock's (UTC) day; after midnight a new file starts."""
        clock = _Clock(_at(2026, 3, 14, 23))
        sink = DayFileSink(tmp_path, 31, clock)
        sink.write({"event": "accepted", "n": 1})
        clock.now = _at(2026, 3, 15, 0)
        sink.write({"event": "accepted", "n": 2})
        sink.close()
        assert [e["n"] for e in _lines(tmp_path / "sys0314.txt")] == [1]
        assert [e["n"] for e in _lines(tmp_path / "sys0315.txt")] == [2]

    def test_files_older_than_retention_are_pruned_when_a_day_starts(self, tmp_path: Path) -> None:
        """Opening a new day removes day files last written before retentionDays ago."""
        clock = _Clock(_at(2026, 1, 1))
        sink = DayFileSink(tmp_path, 3, clock)
        for day in range(1, 6):  # Jan 1..5 at noon, one event each, by the test's clock
            clock.now = _at(2026, 1, day)
            sink.write({"event": "delivery", "day": day})
        # on Jan 5 the cutoff is Jan 2 00:00: Jan 1's file goes, Jan 2's (noon) stays
        assert sorted(p.name for p in tmp_path.glob("sys*.txt")) == [
            "sys0102.txt",
            "sys0103.txt",
            "sys0104.txt",
            "sys0105.txt",
        ]
        clock.now = _at(2026, 2, 20)
        sink.write({"event": "delivery", "day": 51})
        sink.close()
        assert sorted(p.name for p in tmp_path.glob("sys*.txt")) == ["sys0220.txt"]

    def test_last_years_file_of_the_same_date_is_started_afresh(self, tmp_path: Path) -> None:
        """sys0315.txt from a year ago (kept by a long retention) is truncated, not appended to."""
        old = tmp_path / "sys0315.txt"
        old.write_text('{"event":"last year"}\n')
        os.utime(old, (_at(2025, 3, 15), _at(2025, 3, 15)))
        sink = DayFileSink(tmp_path, 400, _Clock(_at(2026, 3, 15)))
        sink.write({"event": "this year"})
        sink.close()
        assert [e["event"] for e in _lines(old)] == ["this year"]

    def test_a_restart_on_the_same_day_appends(self, tmp_path: Path) -> None:
        """A second process on the same day keeps the morning's lines."""
        clock = _Clock(_at(2026, 6, 1, 8))
        first = DayFileSink(tmp_path, 31, clock)
        first.write({"event": "morning"})
        first.close()
        clock.now = _at(2026, 6, 1, 17)
        second = DayFileSink(tmp_path, 31, clock)
        second.write({"event": "evening"})
        second.close()
        assert [e["event"] for e in _lines(tmp_path / "sys0601.txt")] == ["morning", "evening"]


def _zone() -> Zone:
    return Zone(
        mx=[("example.test", "mx1.example.test", 10)], a=[("mx1.example.test", "127.0.0.2")]
    )


@pytest.fixture
def syslog_receivers() -> Iterator[Callable[[str], SyslogReceiver]]:
    started: list[SyslogReceiver] = []

    def start(protocol: str) -> SyslogReceiver:
        receiver = SyslogReceiver(protocol)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def _parsed(line: str) -> dict[str, Any]:
    match = RFC5424.match(line)
    assert match is not None, line
    event: dict[str, Any] = json.loads(match["msg"])
    event["_pri"] = int(match["pri"])
    event["_msgid"] = match["msgid"]
    event["_host"] = match["host"]
    return event


class TestTargets:
    def test_file_target_writes_todays_day_file_and_stdout_keeps_system_events(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """target file: mail lines in <spoolDir>/sysMMDD.txt; start-up still on stdout."""
        dns = start_dns(_zone())
        start_sink("127.0.0.2", smtp_port)
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port},
                "logging": {"target": "file"},
            }
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        today = relay.spool / day_file_name(dt.datetime.now(dt.UTC).date())

        def delivered() -> list[dict[str, Any]]:
            if not today.exists():
                return []
            return [e for e in _lines(today) if e["event"] == "delivery"]

        [delivery] = wait_for(delivered, what="a delivery line in the day file")
        assert delivery["outcome"] == "delivered"
        assert [e["event"] for e in _lines(today)][:2] == ["started", "accepted"]
        assert relay.events("started")  # on stdout too
        assert relay.events("accepted") == []  # mail lines only in the file

    @pytest.mark.parametrize("protocol", ["udp", "tcp"])
    def test_syslog_target_sends_rfc5424_lines(
        self,
        protocol: str,
        syslog_receivers: Callable[[str], SyslogReceiver],
        start_relay: Start,
    ) -> None:
        """target syslog: RFC 5424, facility mail, JSON body; start-up reaches stdout as well."""
        receiver = syslog_receivers(protocol)
        relay: Relay = start_relay(
            {
                "logging": {
                    "target": "syslog",
                    "syslogServer": receiver.server,
                    "syslogProtocol": protocol,
                },
                "allowedNetworks": ["127.0.0.1/32"],
            }
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])

        def events() -> list[dict[str, Any]]:
            return [_parsed(line) for line in receiver.received()]

        wait_for(lambda: any(e["event"] == "accepted" for e in events()), what="accepted")
        accepted = next(e for e in events() if e["event"] == "accepted")
        assert accepted["_pri"] == 2 * 8 + 6  # mail.info
        assert accepted["_msgid"] == "accepted"
        assert accepted["_host"] == "relay.test"
        assert accepted["sender"] == "alice@sender.test"
        assert relay.events("started")
        assert relay.stop() == 0
        wait_for(lambda: any(e["event"] == "stopped" for e in events()), what="stopped via syslog")

    def test_none_target_logs_no_mail_but_system_events(self, start_relay: Start) -> None:
        """target none: no accepted line anywhere; started/stopped still on stdout."""
        relay: Relay = start_relay({"logging": {"target": "none"}})
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        assert relay.stop() == 0
        assert relay.events("accepted") == []
        assert relay.events("started")
        assert relay.events("stopped")
        assert not list(relay.spool.glob("sys*.txt"))


class TestMailLines:
    def test_accepted_refused_and_delivery_lines_carry_the_context(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """One line per accepted/refused message and per attempt, with id, client, route, reply."""
        dns = start_dns(_zone())
        start_sink("127.0.0.2", smtp_port)
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port},
                "allowedNetworks": ["127.0.0.1/32"],
            }
        )
        queue_id = send(relay.port, "alice@sender.test", ["bob@example.test"]).rsplit(" ", 1)[-1]
        with smtplib.SMTP("127.0.0.1", relay.port, source_address=("127.0.0.7", 0)) as client:
            client.ehlo("outsider.test")
            client.mail("eve@sender.test")
            assert client.rcpt("bob@example.test")[0] == 554
        [delivery] = wait_for(lambda: relay.events("delivery"), what="the delivery line")
        [accepted] = relay.events("accepted")
        [refused] = relay.events("refused")
        assert accepted["queue_id"] == queue_id
        assert (accepted["client"], accepted["sender"]) == ("127.0.0.1", "alice@sender.test")
        assert accepted["recipients"] == ["bob@example.test"]
        assert (refused["client"], refused["reason"]) == ("127.0.0.7", "relay_denied")
        assert refused["reply"].startswith("554 5.7.1")
        assert delivery["queue_id"] == queue_id
        assert delivery["recipient"] == "bob@example.test"
        assert (delivery["route"], delivery["destination"]) == ("direct", "example.test")
        assert delivery["host"] == "127.0.0.2"
        assert (delivery["attempt"], delivery["outcome"]) == (1, "delivered")
        assert delivery["reply"].startswith("250")

    def test_debug_adds_transcripts_of_both_directions(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """logging.debug: the client's session (in/out) and the delivery (send/recv)."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.2", smtp_port)
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port},
                "logging": {"target": "stdout", "debug": True},
            }
        )
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        mx.wait_for_messages()
        wait_for(
            lambda: any(
                e["direction"] == "recv" and e["line"].startswith("221")
                for e in relay.events("smtp")
            ),
            what="the end of the delivery transcript",
        )
        lines = [(e["direction"], e["line"]) for e in relay.events("smtp")]
        assert ("in", "MAIL FROM:<alice@sender.test>") in lines
        assert any(d == "out" and line.startswith("250 2.0.0 Ok: queued as") for d, line in lines)
        assert ("send", "MAIL FROM:<alice@sender.test>") in lines
        assert any(d == "send" and line.startswith("DATA (") for d, line in lines)
        assert any(d == "recv" and line.startswith("250") for d, line in lines)

    def test_without_debug_there_is_no_transcript(self, start_relay: Start) -> None:
        """debug off (the default): no smtp transcript events."""
        relay: Relay = start_relay({})
        send(relay.port, "alice@sender.test", ["bob@example.test"])
        assert relay.stop() == 0
        assert relay.events("smtp") == []
