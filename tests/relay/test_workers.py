"""Worker processes: one relay on every core, the spool shared out by queue id."""

from __future__ import annotations

import os
import signal
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from smtprelay import cpus
from smtprelay.spool import Shard

from tests.peers import Relay, Sink, Zone, wait_for
from tests.relay.mail import send


def message_text(number: int) -> str:
    return f"From: alice@sender.test\r\nSubject: {number}\r\n\r\nbody {number}\r\n"


Start = Callable[..., Any]


def _zone() -> Zone:
    return Zone(mx=[("later.test", "mx.later.test", 10)], a=[("mx.later.test", "127.0.0.4")])


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def _sample(relay: Relay, name: str) -> float:
    for family in text_string_to_metric_families(relay.metrics()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


class TestCpuLimit:
    """workers: 0 follows the container's CPU limit, as the kernel shows it to the container."""

    def test_cgroup_v2_quota(self, tmp_path: Path) -> None:
        """cpu.max "150000 100000" (limits.cpu 1500m) is 1.5 CPUs, 2 workers at most."""
        root = _cgroup(tmp_path, {"cpu.max": "150000 100000\n"})
        assert cpus.cgroup_cpu_limit(root) == 1.5
        assert cpus.available_cpus(root) == min(2, len(os.sched_getaffinity(0)))

    def test_cgroup_v2_unlimited(self, tmp_path: Path) -> None:
        """cpu.max "max 100000": no limit, every CPU the process may run on."""
        root = _cgroup(tmp_path, {"cpu.max": "max 100000\n"})
        assert cpus.cgroup_cpu_limit(root) is None
        assert cpus.available_cpus(root) == len(os.sched_getaffinity(0))

    def test_cgroup_v1_quota(self, tmp_path: Path) -> None:
        """cfs_quota_us 50000 / cfs_period_us 100000 (limits.cpu 500m): one worker."""
        root = _cgroup(
            tmp_path,
            {
                "cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
        )
        assert cpus.cgroup_cpu_limit(root) == 0.5
        assert cpus.available_cpus(root) == 1

    def test_cgroup_v1_unlimited(self, tmp_path: Path) -> None:
        """cfs_quota_us -1: no limit."""
        root = _cgroup(
            tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
        )
        assert cpus.cgroup_cpu_limit(root) is None

    def test_this_machine(self) -> None:
        """The real /sys/fs/cgroup is read without error (unlimited here, or a real limit)."""
        limit = cpus.cgroup_cpu_limit()
        assert limit is None or limit > 0
        assert 1 <= cpus.available_cpus() <= len(os.sched_getaffinity(0))


class TestShard:
    def test_every_id_has_exactly_one_owner(self) -> None:
        """For any worker count, each queue id belongs to one worker, and a worker's new ids
        are its own."""
        for count in (1, 2, 3, 5):
            shards = [Shard(index, count) for index in range(count)]
            for shard in shards:
                for _ in range(50):
                    queue_id = shard.new_id(1.0)
                    assert [s.index for s in shards if s.owns(queue_id)] == [shard.index]


class TestWorkers:
    def test_workers_share_the_listener_and_metrics_add_up(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """With workers: 2 there are two worker processes; mail flows; the supervisor's
        /metrics sums their counters."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        relay: Relay = start_relay(
            {"dnsServers": [dns.server], "delivery": {"port": smtp_port}, "workers": 2}
        )
        assert relay.process is not None
        assert len(_children(relay.process.pid)) == 2
        for i in range(10):
            send(relay.port, "alice@sender.test", [f"u{i}@later.test"])
        mx.wait_for_messages(10)
        wait_for(lambda: _sample(relay, "smtprelay_messages_accepted_total") == 10, what="10")
        assert _sample(relay, "smtprelay_connections_total") == 10
        workers = {e["worker"] for e in relay.events("started")}
        assert workers == {0, 1}

    def test_a_restart_with_another_worker_count_delivers_everything_once(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Mail queued by two workers is delivered, each message once, by three."""
        dns = start_dns(_zone())
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port, "queueTimer": "1s"},
                "workers": 2,
            }
        )
        for i in range(12):
            send(relay.port, "alice@sender.test", [f"u{i}@later.test"])
        wait_for(lambda: len(relay.events("delivery")) >= 12, what="12 deferred attempts")
        assert relay.stop() == 0
        assert len(relay.queued()) == 12
        relay.config["workers"] = 3
        relay.config_path.write_text(yaml.safe_dump(relay.config))
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        relay.start()
        mx.wait_for_messages(12, timeout=30)
        wait_for(lambda: relay.queued() == [], what="the spool to empty")
        recipients = sorted(r for m in mx.messages for r in m.recipients)
        assert recipients == sorted(f"u{i}@later.test" for i in range(12))

    def test_one_session_is_received_by_one_worker_and_delivered_by_the_other(
        self, start_dns: Start, start_sink: Start, start_relay: Start, smtp_port: int
    ) -> None:
        """Messages of one SMTP session all reach one worker; each is delivered by the other
        worker (told by inotify, not by the queue timer, here an hour), so receive and
        delivery of a busy session run on two cores."""
        dns = start_dns(_zone())
        mx: Sink = start_sink("127.0.0.4", smtp_port)
        relay: Relay = start_relay(
            {
                "dnsServers": [dns.server],
                "delivery": {"port": smtp_port, "queueTimer": "1h"},
                "workers": 2,
            }
        )
        wait_for(lambda: len(relay.events("started")) == 2, what="both workers")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("client.test")
            for i in range(8):
                client.sendmail("alice@sender.test", [f"u{i}@later.test"], message_text(i))
        mx.wait_for_messages(8, timeout=30)
        wait_for(lambda: len(relay.events("delivery")) == 8, what="8 deliveries logged")
        accepted = {e["queue_id"]: e["pid"] for e in relay.events("accepted")}
        delivered = {e["queue_id"]: e["pid"] for e in relay.events("delivery")}
        assert len(set(accepted.values())) == 1, "one session, one worker"
        assert delivered.keys() == accepted.keys()
        assert all(delivered[q] != accepted[q] for q in accepted), (accepted, delivered)

    def test_a_dead_worker_takes_the_relay_down_for_a_restart(self, start_relay: Start) -> None:
        """A worker killed from outside makes the supervisor stop the rest and exit 1, so the
        kubelet restarts the pod rather than leaving a shard of the queue unserved."""
        relay: Relay = start_relay({"workers": 2})
        assert relay.process is not None
        victim = _children(relay.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert relay.process.wait(30) == 1
        [event] = relay.events("worker_exited")
        assert event["pid"] == victim
