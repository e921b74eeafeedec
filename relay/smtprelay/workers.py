"""Worker processes, so one relay uses every core its pod may use.

The supervisor binds the SMTP socket, forks ``workers`` processes that all accept on it, and
keeps for itself the PID file, the metrics endpoint (the workers' counters summed through
prometheus_client's multiprocess files, plus the queue gauges) and signal handling. The
spool stays one directory: each worker schedules the messages whose id falls in its shard
(spool.Shard), so no message is ever tried by two workers and a restart with another count
shares the queue out anew. What a worker accepts it gives ids in the next worker's shard,
which inotify tells of the new file (:mod:`smtprelay.handoff`): receive and delivery of one
busy session run on two cores.

A worker that dies takes the relay down (exit 1) rather than leaving a shard unserved: the
kubelet restarts the pod, and the spool makes that lossless. A supervisor that dies takes its
workers with it (the kernel's parent-death signal), and the spool's lock file, held by every
process of one relay, keeps a second relay from serving the same spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Gauge

from smtprelay import current, handoff, logs, metrics, reload, service
from smtprelay.admission import SessionCounts
from smtprelay.config import RelayConfig, split_hostport
from smtprelay.cpus import available_cpus
from smtprelay.logs import system_log
from smtprelay.spool import PID_FILE, Shard, Spool, SpoolInUse, oldest_age

_T = TypeVar("_T")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (its transports and scheduling cost about
    half of asyncio's on the relay's hot path), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` on the fastest event loop available."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)


def worker_count(config: RelayConfig) -> int:
    return config.workers or available_cpus()


def serve(config: RelayConfig, source: reload.Source | None = None) -> int:
    """Run the relay: in this process alone, or as a supervisor of worker processes.

    ``source`` (the relay.yaml path and what was read from it) lets each process follow
    changes to the file without a restart.
    """
    count = worker_count(config)
    if count == 1:
        run_loop(service.run(config, source=source))
        return 0
    return _supervise(config, count, source)


def _listen(config: RelayConfig) -> socket.socket:
    host, port = split_hostport(config.listen, 2525)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """End this worker when its supervisor dies, however it dies (SIGKILL included): the
    kernel's parent-death signal, and a check for a parent that died before it was set."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)


def _fork_worker(
    config: RelayConfig,
    listener: socket.socket,
    shard: Shard,
    stats: Path,
    source: reload.Source | None,
    watches: list[int] | None,
    counts: SessionCounts,
) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with(parent)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        metrics.enable_multiprocess(stats)
        watch = None
        if watches is not None:
            watch = watches[shard.index]
            for other in watches:
                if other != watch:
                    os.close(other)
        run_loop(
            service.run(
                config,
                listener=listener,
                shard=shard,
                source=source,
                handoff_fd=watch,
                counts=counts,
            )
        )
        code = 0
    except service.StartError:
        code = 1
    finally:
        os._exit(code)


def _supervise(config: RelayConfig, count: int, source: reload.Source | None) -> int:
    # Everything that must not be shared is done before forking, with no threads running.
    spool = Spool(config.spool_dir)
    try:
        lock = spool.lock_exclusively()  # inherited by the workers: held while any lives
    except SpoolInUse as error:
        system_log().error("start_failed", error=str(error))
        return 1
    listener = _listen(config)
    spool.remove_orphans()
    stats = Path(tempfile.mkdtemp(prefix="smtprelay-metrics-"))
    watches = handoff.open_watches(spool.queue_dir, count)
    counts = SessionCounts()  # limits.sessions and sessionsPerClient are the relay's
    # What the workers inherit stays shared with the supervisor only while nobody writes to
    # its pages: a collection in a worker writes the GC header of every object it examines,
    # copying each page it touches (tens of MiB, sooner the more mail flows). Frozen objects
    # are never examined.
    gc.collect()
    gc.freeze()
    # `queue flush` (SIGUSR1, forwarded to every worker) is held, in the supervisor and in the
    # workers that inherit the mask, until each has its handler: a flush right after the PID
    # file appears must not kill a worker still loading a long queue
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGHUP})  # SIGHUP: likewise
    children = {
        _fork_worker(config, listener, Shard(index, count), stats, source, watches, counts): index
        for index in range(count)
    }
    for fd in watches or ():
        os.close(fd)  # the workers have theirs
    try:
        # asyncio's own loop: the supervisor only reaps workers (SIGCHLD, which uvloop keeps
        # for itself) and serves metrics, off the mail path
        return asyncio.run(
            _parent(config, spool=spool, children=children, stats=stats, source=source)
        )
    finally:
        listener.close()
        shutil.rmtree(stats, ignore_errors=True)
        os.close(lock)


class _QueueGauges:
    """Queue size and oldest message age, read from the spool at scrape time."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.registry = CollectorRegistry()
        self._size = Gauge(
            "smtprelay_queue_messages", "Messages in the spool.", registry=self.registry
        )
        self._oldest = Gauge(
            "smtprelay_queue_oldest_message_age_seconds",
            "Age of the oldest message in the spool.",
            registry=self.registry,
        )

        self._corrupt = Gauge(
            "smtprelay_spool_corrupt_files",
            "Files set aside in the spool's corrupt/ directory (unreadable or not the relay's).",
            registry=self.registry,
        )

    def refresh(self) -> None:
        self._corrupt.set(self._spool.corrupt_count())
        count, oldest = self._spool.recent_census()
        self._size.set(count)
        self._oldest.set(oldest_age(oldest, time.time()))


class _Children:
    """The worker processes, reaped on SIGCHLD; one dying unasked stops the relay."""

    def __init__(self, pids: dict[int, int], stop: asyncio.Event) -> None:
        self.pids = pids
        self.stopping = False
        self.failed = False
        self.all_exited = asyncio.Event()
        self._stop = stop

    def reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.pids.pop(pid, None)
            if not self.stopping:
                system_log().error(
                    "worker_exited", worker=index, pid=pid, status=os.waitstatus_to_exitcode(status)
                )
                self.failed = True
                self._stop.set()
        if not self.pids:
            self.all_exited.set()

    def forward(self, signum: int) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    async def stop(self) -> None:
        """SIGTERM to every worker (each drains as a lone relay would), SIGKILL after grace."""
        self.stopping = True
        self.forward(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.all_exited.wait(), service.TERMINATION_GRACE - 2)
        except TimeoutError:
            self.forward(signal.SIGKILL)
            await self.all_exited.wait()


async def _parent(
    config: RelayConfig,
    *,
    spool: Spool,
    children: dict[int, int],
    stats: Path,
    source: reload.Source | None,
) -> int:
    loop = asyncio.get_running_loop()
    hostname = config.hostname or socket.getfqdn()
    logs.configure(config.logging, spool_dir=config.spool_dir, hostname=hostname)
    log = system_log()
    stop = asyncio.Event()
    workers = _Children(children, stop)
    loop.add_signal_handler(signal.SIGCHLD, workers.reap)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, workers.forward, signal.SIGUSR1)
    # SIGHUP (an administrator's, or a worker's that has just switched to a new relay.yaml):
    # every worker looks at the file now, so all switch together
    watching_file: list[reload.ConfigWatcher] = []

    def look() -> None:
        for watcher in watching_file:
            watcher.check()
        workers.forward(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, look)
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGHUP}
    )  # held since the fork
    workers.reap()  # a worker may have died before the handler was in place

    gauges = _QueueGauges(spool)

    def ready() -> bool:
        return not workers.stopping and bool(workers.pids) and spool.probe_writable()

    # The workers switch to a new relay.yaml themselves; the supervisor follows the same
    # file with the same checks to say on /config and /readyz which one runs, and, when it
    # sees a new one first, has the workers look at once.
    watcher = None
    if source is not None:
        watcher = reload.ConfigWatcher(
            source[0],
            source[1],
            overrides=source[2],
            on_config=lambda loaded: workers.forward(signal.SIGHUP),
            on_refused=lambda refused: None,
        )
        watching_file.append(watcher)
    metrics_host, metrics_port = split_hostport(config.metrics_listen, 9090)
    http = await metrics.serve_http(
        metrics_host,
        metrics_port,
        ready=ready,
        refresh=gauges.refresh,
        render=lambda: metrics.multiprocess_exposition(stats, gauges.registry),
        config=lambda: current.config_state(watcher),
    )
    watching = asyncio.create_task(watcher.run()) if watcher is not None else None
    (config.spool_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    log.info("supervising", workers=sorted(children.items(), key=lambda item: item[1]))
    try:
        await stop.wait()
    finally:
        if watching is not None:
            watching.cancel()
        await workers.stop()
        http.close()
        with contextlib.suppress(FileNotFoundError):
            (config.spool_dir / PID_FILE).unlink()
        log.info("stopped", failed=workers.failed)
        logs.close()
    return 1 if workers.failed else 0
