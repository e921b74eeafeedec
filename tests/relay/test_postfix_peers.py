"""Postfix's own test tools as the relay's peers: smtp-source in front, smtp-sink behind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.peers import Relay, postfix_tool, wait_for

Start = Callable[..., Any]
MESSAGES = 100  # bounded load: smtp-source stops by itself after this many


class TestPostfixPeers:
    def test_smtp_source_burst_reaches_smtp_sink_through_the_relay(
        self, start_relay: Start, smtp_sink: tuple[str, Path]
    ) -> None:
        """100 messages from smtp-source over 5 sessions all arrive at smtp-sink, each
        once and each stamped by the relay."""
        address, dumps = smtp_sink
        relay: Relay = start_relay({"gateway": {"host": address, "sendAll": True}, "workers": 2})
        result = subprocess.run(
            [
                postfix_tool("smtp-source"),
                "-s",
                "5",
                "-m",
                str(MESSAGES),
                "-l",
                "1024",
                "-f",
                "load@source.test",
                "-t",
                "sink@dest.test",
                f"127.0.0.1:{relay.port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr

        def dumped() -> list[Path]:
            """The dumps, once each is complete: smtp-sink creates a file at the start of a
            transaction and fills it as the message streams in."""
            files = [p for p in dumps.iterdir() if p.name.startswith("msg.")]
            done = [p for p in files if b"by relay.test (smtprelay)" in p.read_bytes()]
            return files if len(done) >= MESSAGES else []

        files = wait_for(dumped, timeout=60, what=f"{MESSAGES} messages at smtp-sink")
        assert len(files) == MESSAGES
        queue_ids = set()
        for path in files:
            text = path.read_bytes().decode(errors="replace")
            assert "by relay.test (smtprelay)" in text
            queue_ids.add(text.split(" id ", 1)[1].split()[0].rstrip(";"))
        assert len(queue_ids) == MESSAGES
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
