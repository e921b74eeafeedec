"""admission.SessionCounts: the session limits, counted once for every worker of a relay."""

from __future__ import annotations

import os

from smtprelay.admission import CLIENT_FULL, SESSIONS_FULL, SessionCounts
from smtprelay.config import Limits


def _limits(sessions: int, per_client: int) -> Limits:
    return Limits.model_validate({"sessions": sessions, "sessionsPerClient": per_client})


class TestSessionCounts:
    def test_per_client_then_total(self) -> None:
        """A client's own bound comes first; the total bounds every client together."""
        counts = SessionCounts()
        limits = _limits(3, 2)
        assert counts.admit("192.0.2.1", limits) is None
        assert counts.admit("192.0.2.1", limits) is None
        assert counts.admit("192.0.2.1", limits) == CLIENT_FULL
        assert counts.admit("192.0.2.2", limits) is None
        assert counts.admit("192.0.2.3", limits) == SESSIONS_FULL
        counts.leave("192.0.2.1")
        assert counts.admit("192.0.2.3", limits) is None
        assert counts.total() == 3

    def test_limits_are_read_at_each_admission(self) -> None:
        """Lower limits refuse the next session; the ones already in stay counted."""
        counts = SessionCounts()
        for _ in range(3):
            assert counts.admit("192.0.2.1", _limits(10, 5)) is None
        assert counts.admit("192.0.2.1", _limits(10, 2)) == CLIENT_FULL
        assert counts.admit("192.0.2.9", _limits(3, 2)) == SESSIONS_FULL

    def test_a_shared_bucket_refuses_early_never_late(self) -> None:
        """With one bucket, two clients share a budget: the second is refused at the first's
        bound, never admitted past its own."""
        counts = SessionCounts(buckets=1)
        limits = _limits(10, 2)
        assert counts.admit("192.0.2.1", limits) is None
        assert counts.admit("192.0.2.1", limits) is None
        assert counts.admit("192.0.2.2", limits) == CLIENT_FULL

    def test_a_leave_never_takes_a_count_below_zero(self) -> None:
        """A stray leave (a bug elsewhere) cannot mint a slot beyond the limit."""
        counts = SessionCounts()
        counts.leave("192.0.2.1")
        limits = _limits(5, 1)
        assert counts.admit("192.0.2.1", limits) is None
        assert counts.admit("192.0.2.1", limits) == CLIENT_FULL

    def test_a_forked_process_counts_in_the_same_place(self) -> None:
        """What a worker forked after the counts were made admits, its siblings see."""
        counts = SessionCounts()
        limits = _limits(10, 1)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if counts.admit("192.0.2.1", limits) is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert counts.admit("192.0.2.1", limits) == CLIENT_FULL
        assert counts.total() == 1
