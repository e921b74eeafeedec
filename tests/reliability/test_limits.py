"""limits.*: what one client, and all together, may take of the relay."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from smtprelay.auth import FailureLimiter

from tests.peers import Relay, wait_for
from tests.reliability.wire import Wire

Start = Callable[..., Any]


def _closed(sock: socket.socket) -> bool:
    """True once the relay has closed the connection (EOF or reset)."""
    sock.settimeout(0.2)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _greeting(port: int) -> bytes:
    with Wire(port) as wire:
        return wire.greeting


class TestErrors:
    def test_a_client_that_collects_refusals_is_disconnected(self, start_relay: Start) -> None:
        """A client outside allowedNetworks gets 20 refusals, then 421 and the door."""
        relay: Relay = start_relay({"allowedNetworks": ["127.0.0.1/32"]})
        with Wire(relay.port, source="127.0.0.55") as wire:
            wire.command(b"EHLO client.test")
            wire.command(b"MAIL FROM:<alice@sender.test>")
            replies = [wire.command(b"RCPT TO:<bob@example.test>") for _ in range(20)]
            assert all(reply.startswith(b"554 5.7.1") for reply in replies)
            assert wire.reply().startswith(b"421 4.7.0")
            assert wait_for(lambda: _closed(wire.sock), what="the disconnect")
        assert len(relay.events("refused")) == 20


def _read_to_the_end(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the relay sent, and whether the connection ended in a reset, not a FIN."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, False
        received += chunk


def _welcome(port: int, *sources: str) -> bool:
    """Whether sessions from ``sources``, open at once, are all greeted with 220."""
    wires = [Wire(port, source=source) for source in sources]
    try:
        return all(wire.greeting.startswith(b"220") for wire in wires)
    finally:
        for wire in wires:
            wire.close()


def _last_reply(received: bytes) -> bytes:
    return received.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]


class TestHangUp:
    """A hang-up with input still coming is a lingering close: the reply, then FIN, never RST."""

    def test_a_client_still_sending_reads_the_421_and_a_clean_end(self, start_relay: Start) -> None:
        """20 bad lines, then 2-4 MB more: the 421 arrives every time and the close is a FIN."""
        relay: Relay = start_relay({"limits": {"sessionsPerClient": 2}})
        for n in range(12):
            payload = b"X bogus\r\n" * 20 + (b"X-Big: " + b"h" * 900 + b"\r\n") * (2000 + 150 * n)
            with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as sock:
                sock.sendall(payload)  # all of it: the relay reads on after its 421
                sock.sendall(b"NOOP\r\n")  # served no longer
                received, reset = _read_to_the_end(sock)
            assert not reset, f"session {n}: reset after {received[-120:]!r}"
            assert _last_reply(received).startswith(b"421 4.7.0 Too many errors"), received[-200:]
            assert received.count(b"\r\n") == 22  # greeting, 20 refusals, 421: nothing after
        # each hung-up session left when its client closed: a third one is still welcome
        assert wait_for(
            lambda: _welcome(relay.port, "127.0.0.1", "127.0.0.1"),
            what="the hung-up sessions to leave",
        )

    def test_quit_with_more_pipelined_behind_it_gets_its_221(self, start_relay: Start) -> None:
        """What a client pipelines past QUIT is discarded unread, and does not reset the 221."""
        relay: Relay = start_relay({})
        for n in range(12):
            behind = b"NOOP\r\n" * (100_000 + 20_000 * n)
            with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as sock:
                sock.sendall(b"EHLO client.test\r\nQUIT\r\n" + behind)
                received, reset = _read_to_the_end(sock)
            assert not reset, f"session {n}: reset after {received[-120:]!r}"
            assert _last_reply(received) == b"221 2.0.0 Bye", received[-200:]


class TestSessions:
    def test_sessions_per_client_and_in_total_are_bounded(self, start_relay: Start) -> None:
        """The third session from one address gets 421; so does the fourth in total."""
        relay: Relay = start_relay({"limits": {"sessions": 3, "sessionsPerClient": 2}})
        first, second = Wire(relay.port), Wire(relay.port)
        assert first.greeting.startswith(b"220")
        assert second.greeting.startswith(b"220")
        with Wire(relay.port) as third:
            assert third.greeting.startswith(b"421 4.7.0")
        with Wire(relay.port, source="127.0.0.2") as other:
            assert other.greeting.startswith(b"220")
            with Wire(relay.port, source="127.0.0.3") as fourth:
                assert fourth.greeting.startswith(b"421 4.3.2")
        first.close()
        wait_for(lambda: Wire(relay.port).greeting.startswith(b"220"), what="a freed session slot")
        second.close()

    def test_the_limits_are_the_relays_not_each_workers(self, start_relay: Start) -> None:
        """With two workers accepting on one socket, sessionsPerClient 2 still admits two
        sessions from one address, and sessions 3 three in all, whichever worker takes each."""
        relay: Relay = start_relay(
            {"workers": 2, "limits": {"sessions": 3, "sessionsPerClient": 2}}
        )
        wait_for(lambda: len(relay.events("started")) == 2, what="both workers started")
        mine = [Wire(relay.port) for _ in range(8)]
        others = [Wire(relay.port, source="127.0.0.2") for _ in range(4)]
        try:
            greetings = [wire.greeting[:9] for wire in mine]
            assert greetings.count(b"220 relay") == 2, greetings
            assert greetings.count(b"421 4.7.0") == 6, greetings
            greetings = [wire.greeting[:9] for wire in others]
            assert greetings.count(b"220 relay") == 1, greetings
            assert greetings.count(b"421 4.3.2") == 3, greetings
        finally:
            for wire in mine + others:
                wire.close()
        # every slot comes back once its session ends
        assert wait_for(
            lambda: _welcome(relay.port, "127.0.0.1", "127.0.0.1", "127.0.0.2"),
            what="the freed session slots",
        )


class TestTimeouts:
    def test_a_slow_command_cannot_stretch_the_command_timeout(self, start_relay: Start) -> None:
        """A byte every half second never completes a command; the relay hangs up after
        commandTimeout all the same."""
        relay: Relay = start_relay({"limits": {"commandTimeout": "2s"}})
        with Wire(relay.port) as wire:
            began = time.monotonic()
            closed = False
            for byte in b"EHLO " + b"x" * 40:
                try:
                    wire.send(bytes([byte]))
                except OSError:
                    closed = True
                    break
                if _closed(wire.sock):
                    closed = True
                    break
                time.sleep(0.3)
            assert closed
            assert 1.5 < time.monotonic() - began < 8

    def test_a_slow_message_cannot_stretch_the_data_timeout(self, start_relay: Start) -> None:
        """Body lines trickled after 354 are cut off at dataTimeout; nothing is queued."""
        relay: Relay = start_relay({"limits": {"dataTimeout": "2s"}})
        with Wire(relay.port) as wire:
            wire.command(b"EHLO client.test")
            wire.command(b"MAIL FROM:<alice@sender.test>")
            wire.command(b"RCPT TO:<bob@example.test>")
            assert wire.command(b"DATA").startswith(b"354")
            began = time.monotonic()
            closed = False
            while time.monotonic() - began < 10:
                try:
                    wire.send(b"a line\r\n")
                except OSError:
                    closed = True
                    break
                if _closed(wire.sock):
                    closed = True
                    break
                time.sleep(0.2)
            assert closed
            assert time.monotonic() - began < 6
        assert relay.queued() == []


class TestAuthLimiter:
    def test_checks_in_flight_count_toward_the_limit(self) -> None:
        """Five password checks running at once for one address block a sixth."""
        limiter = FailureLimiter(limit=5)
        for _ in range(5):
            assert not limiter.blocked("192.0.2.1")
            limiter.begin("192.0.2.1")
        assert limiter.blocked("192.0.2.1")
        assert not limiter.blocked("192.0.2.2")
        limiter.end("192.0.2.1")
        assert not limiter.blocked("192.0.2.1")
