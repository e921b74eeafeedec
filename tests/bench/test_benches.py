"""Each benchmark, run once in a tiny configuration so it keeps working.

Benchmarks measure; they are not timed tests. These runs assert that a benchmark completes
and prints its report, never how fast anything was. Their scratch directories go under
/var/tmp, the benchmarks' default: Postfix's daemons (user postfix) must reach their queue,
which a pytest tmp_path (mode 0700, root's) does not allow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import operator_scale, queue_scale, report, throughput


class TestThroughput:
    def test_a_tiny_run_of_both_sides_and_a_baseline_reports_ratios(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """20 messages, 2 sessions, the relay of HEAD~0 as baseline: every trial completes."""
        code = throughput.main(
            [
                *("--messages", "20", "--sessions", "2", "--repeat", "1"),
                *("--baseline", "HEAD", "--timeout", "120"),
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "ratio relay/postfix" in out
        assert "ratio relay before/postfix" in out


class TestQueueScale:
    def test_a_tiny_queue_is_listed_started_and_run_on_both_sides(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """30 deferred messages: mailq, start and the queue run complete on both sides."""
        code = queue_scale.main(
            [
                *("--messages", "30", "--repeat", "1"),
                *("--timeout", "120", "--run-timeout", "120"),
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "(30 listed)" in out
        assert "queue run, messages tried a second" in out


@pytest.mark.cluster
class TestOperatorScale:
    def test_a_few_relays_converge_and_idle(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Three SmtpRelays at once, four while idle for a few seconds: all Ready, reported."""
        code = operator_scale.main(
            [
                *("--relays", "3", "--idle-relays", "4", "--idle-seconds", "3"),
                *("--settle", "1", "--timeout", "180", "--json", str(tmp_path / "r.json")),
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "until every one is Ready" in out
        assert "idle: operator CPU" in out


class TestReport:
    def test_steal_is_the_share_of_all_cpu_time_the_hypervisor_took(self) -> None:
        before = report.cpu_times("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
        after = report.cpu_times("cpu  200 0 100 1600 20 0 10 70 0 0\n")
        assert before == (1000, 35)
        assert report.steal_share(before, after) == pytest.approx(0.035)
        assert report.steal_share(after, after) == 0.0
        assert report.cpu_times("garbage\n") == (0, 0)
