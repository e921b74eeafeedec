"""PIPELINING (RFC 2920) to the next hop: MAIL, every RCPT and DATA go in one write where the
hop offers it, and every reply is read in its turn, also when replies come late, together or
refusing (the connection cache with pipelining: test_delivery.py). Peers: aiosmtpd sinks that offer PIPELINING (Postfix's smtp-sink, which offers it
too, carries the DSN tests and the benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.peers import Relay, Sink, wait_for
from tests.relay.mail import send

Start = Callable[..., Any]


def _relay(start_relay: Start, gateway: str, **settings: Any) -> Relay:
    config: dict[str, Any] = {
        "gateway": {"host": gateway, "sendAll": True},
        "delivery": {"concurrency": 1, "queueTimer": "1h"},
        "logging": {"target": "stdout", "debug": True},
        **settings,
    }
    relay: Relay = start_relay(config)
    return relay


def _outcomes(relay: Relay) -> dict[str, tuple[str, str]]:
    return {e["recipient"]: (e["outcome"], e["reply"][:3]) for e in relay.events("delivery")}


def test_envelope_goes_in_one_write_and_each_recipient_gets_its_own_reply(
    start_sink: Start, start_relay: Start, smtp_port: int
) -> None:
    """One refused (5xx), one deferred (4xx), two accepted: the replies come late, one by
    one, and each lands on its own recipient; the sink had the RCPTs before it answered MAIL."""
    replies = {"gone": "550 5.1.1 no such user", "later": "450 4.2.1 try later"}
    gateway: Sink = start_sink(
        "127.0.0.9",
        smtp_port,
        pipelining=True,
        rcpt_delay=0.05,
        rcpt_reply=lambda address: replies.get(address.split("@")[0], "250 2.1.5 OK"),
    )
    relay = _relay(start_relay, f"127.0.0.9:{smtp_port}")
    recipients = ["a@example.test", "gone@example.test", "later@example.test", "b@example.test"]
    send(relay.port, "alice@sender.test", recipients)
    [got] = gateway.wait_for_messages(1)
    assert got.recipients == ("a@example.test", "b@example.test")
    wait_for(lambda: len(_outcomes(relay)) >= 4, what="an outcome for every recipient")
    outcomes = _outcomes(relay)
    assert outcomes["a@example.test"] == ("delivered", "250")
    assert outcomes["b@example.test"] == ("delivered", "250")
    assert outcomes["gone@example.test"] == ("failed", "550")
    assert outcomes["later@example.test"] == ("deferred", "450")
    behind_mail = gateway.after_mail[0]  # (then the bounce for gone@, to alice@)
    assert behind_mail.count(b"RCPT TO:") == 4
    assert b"DATA\r\n" in behind_mail
    sent = [e["line"] for e in relay.events("smtp") if e["direction"] == "send"]
    assert "RCPT TO:<later@example.test>" in sent


def test_without_pipelining_on_offer_commands_go_one_by_one(
    start_sink: Start, start_relay: Start, smtp_port: int
) -> None:
    """A hop that does not offer PIPELINING gets each command after the previous reply."""
    gateway: Sink = start_sink("127.0.0.9", smtp_port)
    relay = _relay(start_relay, f"127.0.0.9:{smtp_port}")
    send(relay.port, "alice@sender.test", ["a@example.test", "b@example.test"])
    gateway.wait_for_messages(1)
    assert gateway.after_mail == [b""]
    sent = [e["line"] for e in relay.events("smtp") if e["direction"] == "send"]
    assert "DATA (" in " ".join(sent)


def test_data_taken_with_no_recipient_is_ended_empty(
    start_sink: Start, start_relay: Start, smtp_port: int
) -> None:
    """A broken hop answers the pipelined DATA with 354 although it refused every RCPT: the
    relay ends the DATA at once with nothing in it, defers the recipients with the RCPT
    reply, and the session carries the next message (after RSET) instead of hanging."""
    gateway: Sink = start_sink(
        "127.0.0.9",
        smtp_port,
        pipelining=True,
        data_despite_refusals=True,
        rcpt_reply=lambda address: "450 4.2.1 try later",
    )
    relay = _relay(start_relay, f"127.0.0.9:{smtp_port}")
    send(relay.port, "alice@sender.test", ["a@example.test", "b@example.test"])
    wait_for(lambda: len(_outcomes(relay)) >= 2, timeout=30, what="both recipients' outcomes")
    send(relay.port, "alice@sender.test", ["c@example.test"])
    wait_for(lambda: len(_outcomes(relay)) >= 3, timeout=30, what="the next message's outcome")
    assert _outcomes(relay) == {
        "a@example.test": ("deferred", "450"),
        "b@example.test": ("deferred", "450"),
        "c@example.test": ("deferred", "450"),
    }
    assert [m.data for m in gateway.messages] == [b"", b""]  # two empty DATAs, no message
    sent = [e["line"] for e in relay.events("smtp") if e["direction"] == "send"]
    assert "RSET" in sent
