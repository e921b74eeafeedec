"""A private Postfix instance (its own config and queue directory) to measure against.

It never touches the system's ``/etc/postfix`` instance or port 25: ``postfix -c DIR`` runs
a second master with ``inet_interfaces = 127.0.0.1`` and smtpd on a free port. Chroot is off
(a chroot under a scratch directory would need ``/etc`` files copied in); queue fsync is on,
as by default.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from bench.procs import port_open
from tests.peers import free_port, wait_for

_MASTER_CF = Path("/etc/postfix/master.cf")
_QUEUES = ("incoming", "active", "deferred", "maildrop", "hold")


def _master_cf(listen: str) -> str:
    """The distribution's master.cf with chroot off and smtpd moved to ``listen``."""
    lines = []
    for line in _MASTER_CF.read_text().splitlines():
        if line.startswith("#") or not line.strip() or line[0].isspace():
            lines.append(line)
            continue
        fields = line.split()
        if fields[:2] == ["smtp", "inet"]:
            fields[0] = listen
        if len(fields) >= 8:
            fields[4] = "n"
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


class Postfix:
    """``postfix -c <dir>/conf`` with its queue in ``<dir>/queue``, relaying to ``relayhost``."""

    def __init__(self, workdir: Path, *, relayhost: str, extra: dict[str, str] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.conf = workdir / "conf"
        self.queue = workdir / "queue"
        self.data = workdir / "data"
        self.maillog = workdir / "maillog"
        for directory in (self.conf, self.queue, self.data):
            directory.mkdir(parents=True, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(self.data, owner.pw_uid, grp.getgrnam("postfix").gr_gid)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix-bench.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": relayhost,
            "local_transport": "error:no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_peername_lookup": "no",
            "maillog_file": str(self.maillog),
            "syslog_name": "postfix-bench",
            "biff": "no",
            **(extra or {}),
        }
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.conf / "master.cf").write_text(_master_cf(f"127.0.0.1:{self.port}"))
        self.master_pid: int | None = None

    def _postfix(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["postfix", "-c", str(self.conf), *args],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> float:
        """Start the master; returns seconds until smtpd answers on its port."""
        begin = time.monotonic()
        self._postfix("start")
        wait_for(lambda: port_open("127.0.0.1", self.port), timeout=30, what="postfix smtpd")
        elapsed = time.monotonic() - begin
        self.master_pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        return elapsed

    def stop(self) -> None:
        if self.master_pid is None:
            return
        self._postfix("stop")
        pid = self.master_pid

        def gone() -> bool:
            return not Path(f"/proc/{pid}").exists()

        wait_for(gone, timeout=30, what="postfix master to exit")
        self.master_pid = None

    def queued(self, *queues: str) -> int:
        """Queue files under the named queue directories (all of them by default)."""
        total = 0
        for name in queues or _QUEUES:
            for _, _, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def postqueue_list(self) -> tuple[float, int]:
        """Time ``postqueue -p`` (mailq) and count the messages it lists."""
        begin = time.monotonic()
        out = subprocess.run(
            ["postqueue", "-c", str(self.conf), "-p"],
            check=True,
            timeout=600,
            capture_output=True,
        ).stdout
        elapsed = time.monotonic() - begin
        listed = sum(
            1 for line in out.splitlines() if line[:1].isalnum() and not line.startswith(b"-")
        )
        return elapsed, listed

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
