"""The relay's real peers for the reliability tests: the same fixtures as tests/relay."""

from tests.relay.conftest import smtp_port, start_dns, start_relay, start_sink

__all__ = ["smtp_port", "start_dns", "start_relay", "start_sink"]
