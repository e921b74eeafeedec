"""A hypothesis fuzzer of the SMTP dialogue against a real relay process over real sockets.

Each generated session is a run of commands, malformed lines (NULs, bare CR and LF, random
bytes, overlong lines), message bodies with smuggling sequences and enormous headers, all
written pipelined, then ended with ``<CRLF>.<CRLF>QUIT``. The relay must answer every one
with well-formed replies, hang up only with 221 or 421, never stop serving, and keep in its
spool exactly the messages it answered 250 to after DATA: nothing it refused is relayed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.peers import Relay, free_port

Start = Callable[..., Any]
SESSIONS = int(os.environ.get("SMTPRELAY_FUZZ_SESSIONS", "10000"))
REPLY = re.compile(rb"^[2-5][0-9]{2}([ -][\x20-\x7e]*)?$")
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9a-f]{21})$")
INSIDE, OUTSIDE = "127.0.0.1", "127.0.0.66"

_COMMANDS = [
    b"EHLO client.test",
    b"HELO client.test",
    b"EHLO [127.0.0.1]",
    b"EHLO",
    b"MAIL FROM:<alice@sender.test>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<alice@sender.test> SIZE=1000",
    b"MAIL FROM:<alice@sender.test> SIZE=99999999999999",
    b"MAIL FROM:<alice@sender.test> BODY=8BITMIME",
    b"MAIL FROM:alice@sender.test",
    b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<postmaster>",
    b"RCPT TO:<carol>",
    b"RCPT TO:<u%other.test@example.test>",
    b"RCPT TO:<@hop.test:u@example.test>",
    b'RCPT TO:<"quoted local"@example.test>',
    b"RCPT TO:<u@[127.0.0.1]>",
    b"RCPT TO:<u@[IPv6:::1]>",
    b"RCPT TO:<a\x00b@example.test>",
    b"RCPT TO:<a\x01b@example.test>",
    b"DATA",
    b"DATA x",
    b"RSET",
    b"NOOP",
    b"HELP",
    b"VRFY bob",
    b"EXPN list",
    b"STARTTLS",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
    b"AUTH LOGIN",
    b"BDAT 10 LAST",
    b"QUIT",
]
_SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n..\r\n"]
_ENDINGS = [b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\x00\r\n"]


def _line() -> st.SearchStrategy[bytes]:
    command = st.sampled_from(_COMMANDS)
    garbage = st.binary(max_size=120)
    overlong = st.builds(
        lambda verb, n: verb + b"a" * n,
        st.sampled_from([b"MAIL FROM:<", b"RCPT TO:<", b"EHLO ", b"X"]),
        st.integers(400, 3000),
    )
    text = st.one_of(command, command, command, garbage, overlong)
    return st.builds(lambda t, e: t + e, text, st.sampled_from(_ENDINGS))


def _body() -> st.SearchStrategy[bytes]:
    piece = st.one_of(
        st.binary(max_size=200),
        st.sampled_from(_SMUGGLING),
        st.sampled_from(
            [b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"]
        ),
        st.builds(lambda n: b"X-Big: " + b"h" * 990 + b"\r\n" * n, st.integers(1, 3)),
        st.builds(lambda n: (b"X-Big: " + b"h" * 900 + b"\r\n") * n, st.integers(1, 12)),
        st.just(b"Received: from loop\r\n" * 51),
    )
    return st.builds(b"".join, st.lists(piece, max_size=6))


def _transaction() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda rcpts, body, end: (
            b"EHLO client.test\r\nMAIL FROM:<alice@sender.test>\r\n"
            + b"".join(b"RCPT TO:<%s>\r\n" % r for r in rcpts)
            + b"DATA\r\n"
            + body
            + end
        ),
        st.lists(
            st.sampled_from([b"bob@example.test", b"carol@example.test", b"bad\x01@x"]),
            min_size=1,
            max_size=3,
        ),
        _body(),
        st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b"\n.\n", b""]),
    )


SESSION = st.tuples(
    st.sampled_from([INSIDE, INSIDE, INSIDE, OUTSIDE]),
    st.lists(st.one_of(_line(), _line(), _transaction()), max_size=10),
)


@dataclass
class Tally:
    sessions: int = 0
    bytes_sent: int = 0
    replies: int = 0
    acked: set[str] = field(default_factory=set)
    closes: dict[bytes, int] = field(default_factory=dict)


def _converse(port: int, source: str, steps: list[bytes], tally: Tally) -> list[bytes]:
    """Write the session pipelined, end it, and read every reply until the relay hangs up."""
    payload = b"".join(steps) + b"\r\n.\r\nQUIT\r\n"
    received = b""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=30, source_address=(source, 0)
    ) as sock:
        # the relay may hang up early (421): what it said is still to be read
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    tally.sessions += 1
    tally.bytes_sent += len(payload)
    assert received.endswith(b"\r\n"), received[-200:]
    return received[:-2].split(b"\r\n")


def _check(lines: list[bytes], source: str, tally: Tally) -> None:
    assert lines[0].startswith(b"220 "), lines[0]
    for line in lines:
        assert REPLY.match(line), line
        if found := QUEUED.match(line):
            assert source == INSIDE, "a client outside allowedNetworks got mail queued"
            tally.acked.add(found.group(1).decode())
    last = lines[-1][:3]
    assert last in (b"221", b"421"), lines[-3:]
    tally.closes[last] = tally.closes.get(last, 0) + 1
    tally.replies += len(lines)


def test_no_session_crashes_the_relay_or_relays_what_it_refused(start_relay: Start) -> None:
    """SESSIONS generated sessions: valid replies only, the relay keeps serving, and its
    spool holds exactly the messages it answered 250 to."""
    relay: Relay = start_relay(
        {
            "allowedNetworks": ["127.0.0.1/32"],
            "delivery": {"port": free_port(), "queueTimer": "1h"},
            "maxMessageSize": "200Ki",
            "logging": {"target": "file"},  # the default: every refusal is a line on disk
        },
    )
    tally = Tally()

    @settings(
        max_examples=SESSIONS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(SESSION)
    def session(case: tuple[str, list[bytes]]) -> None:
        source, steps = case
        _check(_converse(relay.port, source, steps, tally), source, tally)

    session()
    assert relay.ready()
    spooled = {name.removesuffix(".eml") for name in relay.queued()}
    assert spooled == tally.acked
    print(
        f"fuzz: {tally.sessions} sessions, {tally.bytes_sent} bytes sent, "
        f"{tally.replies} replies, {len(tally.acked)} messages queued, closes {tally.closes}"
    )
