"""Start/Stop Service: wires the stages around the spool and runs them until SIGTERM.

On SIGTERM the listener closes first, sessions in progress get ``SESSION_GRACE`` seconds to
finish, deliveries in flight get ``DELIVERY_GRACE`` seconds, then the process exits 0. Any
message that got a 250 is on disk by then and is picked up again at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import yaml

from smtprelay import logs
from smtprelay.config import RelayConfig, split_hostport
from smtprelay.deliver import Credentials
from smtprelay.logs import system_log
from smtprelay.metrics import METRICS, serve_http
from smtprelay.receive import RelayHandler, RelaySMTP
from smtprelay.route import MxResolver
from smtprelay.schedule import Scheduler
from smtprelay.spool import PID_FILE, Spool

SESSION_GRACE = 20.0
DELIVERY_GRACE = 5.0


def load_credentials(path: Path | None) -> Credentials | None:
    """A Secret mounted as a directory (``username``, ``password`` files) or a YAML file."""
    if path is None:
        return None
    if path.is_dir():
        return Credentials(
            username=(path / "username").read_text().strip(),
            password=(path / "password").read_text().strip(),
        )
    data = yaml.safe_load(path.read_text())
    return Credentials(username=str(data["username"]), password=str(data["password"]))


class _Sessions:
    """The SMTP sessions open now, so shutdown can wait for them."""

    def __init__(self) -> None:
        self.open: set[asyncio.BaseTransport] = set()


class _TrackedSMTP(RelaySMTP):
    def __init__(self, *args: Any, sessions: _Sessions, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions = sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sessions.open.add(transport)
        METRICS.connections.inc()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.open.discard(self.transport)
        super().connection_lost(error)


def _oldest_age(spool: Spool) -> float:
    first = next(spool.ids(), None)
    if first is None:
        return 0.0
    return max(0.0, time.time() - int(first[:11], 16) / 1000)


async def run(config: RelayConfig, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (by SIGTERM/SIGINT when not given)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    hostname = config.hostname or socket.getfqdn()
    logs.configure(config.logging, spool_dir=config.spool_dir, hostname=hostname)
    log = system_log()

    spool = Spool(config.spool_dir)
    spool.remove_orphans()
    (config.spool_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    scheduler = Scheduler(
        spool=spool,
        settings=config,
        hostname=hostname,
        resolver=MxResolver(config.dns_servers),
        credentials=load_credentials(config.gateway.credentials_file),
    )
    recovered = scheduler.load()
    spool.subscribe(scheduler.notify)

    tls_context: ssl.SSLContext | None = None
    if config.tls is not None:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(config.tls.cert_file, config.tls.key_file)

    handler = RelayHandler(settings=config, hostname=hostname, spool=spool)
    sessions = _Sessions()

    def factory() -> _TrackedSMTP:
        return _TrackedSMTP(
            handler,
            sessions=sessions,
            data_size_limit=config.max_message_size,
            hostname=hostname,
            ident="smtprelay",
            tls_context=tls_context,
            auth_require_tls=True,
            timeout=300,
        )

    host, port = split_hostport(config.listen, 2525)
    server = await loop.create_server(factory, host or None, port, reuse_address=True)

    def ready() -> bool:
        return server.is_serving() and spool.probe_writable()

    def refresh() -> None:
        METRICS.queue_size.set(scheduler.queued)
        METRICS.oldest.set(_oldest_age(spool))

    metrics_host, metrics_port = split_hostport(config.metrics_listen, 9090)
    http = await serve_http(metrics_host, metrics_port, ready=ready, refresh=refresh)
    delivery = asyncio.create_task(scheduler.run())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("flush", due=scheduler.flush()))

    log.info(
        "started",
        listen=config.listen,
        metrics=config.metrics_listen,
        spool=str(config.spool_dir),
        recovered=recovered,
        hostname=hostname,
        log_target=config.logging.target,
    )
    try:
        await stop.wait()
    finally:
        log.info("stopping", sessions=len(sessions.open))
        server.close()
        deadline = loop.time() + SESSION_GRACE
        while sessions.open and loop.time() < deadline:  # noqa: ASYNC110 -- a bounded drain
            await asyncio.sleep(0.05)
        for transport in list(sessions.open):
            transport.close()
        await scheduler.stop(DELIVERY_GRACE)
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        http.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(signum)
        with contextlib.suppress(FileNotFoundError):
            (config.spool_dir / PID_FILE).unlink()
        log.info("stopped", queued=len(list(spool.ids())))
