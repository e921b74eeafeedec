"""Start/Stop Service: wires the stages around the spool and runs them until SIGTERM.

On SIGTERM the listener closes first (``/readyz`` turns 503), idle sessions are told 421 and
closed, and two drains run side by side: sessions in the middle of a transaction get
``SESSION_GRACE`` seconds to finish it (and get their 250), deliveries in flight get
``DELIVERY_GRACE`` seconds; then the process exits 0. The longer of the two, plus a little for
closing, must fit in the pod's ``terminationGracePeriodSeconds`` (30, as the operator
renders it), or the kubelet's SIGKILL cuts the drain short. Any message that got a 250 is on
disk by then and is picked up again at the next start; a session cut off before its 250 is
the client's to retry, and an attempt cut off is tried again after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

from smtprelay import current, handoff, logs, reload
from smtprelay.admission import SessionCounts
from smtprelay.auth import FailureLimiter, Users, UsersFileError
from smtprelay.config import Limits, RelayConfig, split_hostport
from smtprelay.logs import system_log
from smtprelay.metrics import METRICS, serve_http
from smtprelay.receive import Network, RelayHandler, RelaySMTP, client_ip, parse_networks
from smtprelay.reload import Live
from smtprelay.schedule import Scheduler, Setup
from smtprelay.spool import PID_FILE, Shard, Spool, SpoolInUse, oldest_age
from smtprelay.tlsreload import ReloadingContext

SESSION_GRACE = 20.0
DELIVERY_GRACE = 20.0
TERMINATION_GRACE = 30.0  # the operator's terminationGracePeriodSeconds


# Held from the start until their handlers are in place: their default action ends the
# process. SIGUSR1 is `queue flush`; SIGHUP says "look at relay.yaml now".
_HELD = {signal.SIGUSR1, signal.SIGHUP}


class _Sessions:
    """This process's open SMTP sessions, so shutdown can tell them and wait for them; the
    counts that bound them (``limits.sessions`` / ``limits.sessionsPerClient``, read from
    the current settings) are the relay's, shared with the other workers."""

    def __init__(self, counts: SessionCounts, limits: Callable[[], Limits]) -> None:
        self.open: set[RelaySMTP] = set()
        self._counts = counts
        self._limits = limits

    def admit(self, session: RelaySMTP, client: str) -> str | None:
        """Take ``session`` in, or return the 421 it gets instead."""
        refusal = self._counts.admit(client, self._limits())
        if refusal is None:
            self.open.add(session)
        return refusal

    def leave(self, session: RelaySMTP, client: str) -> bool:
        if session not in self.open:
            return False
        self.open.discard(session)
        self._counts.leave(client)
        return True


class _TrackedSMTP(RelaySMTP):
    def __init__(self, *args: Any, sessions: _Sessions, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions = sessions
        self._peer_ip = ""
        self._turned_away = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._peer_ip == "":  # STARTTLS calls this again for the same session
            self._peer_ip = str(client_ip(transport.get_extra_info("peername")))
            refusal = self._sessions.admit(self, self._peer_ip)
            if refusal is not None:
                self._turned_away = True
                METRICS.refused.labels(reason="session_limit").inc()
                # uvloop's transports write without subclassing asyncio.WriteTransport
                cast(asyncio.WriteTransport, transport).write(refusal.encode() + b"\r\n")
                transport.close()
                return
            METRICS.connections.inc()
            METRICS.connections_open.inc()
            first = True
        else:
            first = False
        super().connection_made(transport)
        if first and self.session is not None:
            self.event_handler.settings(self.session)  # the session's settings, from now on

    def connection_lost(self, error: Exception | None) -> None:
        if self._turned_away:
            return  # never a session: aiosmtpd saw nothing of it
        if self._sessions.leave(self, self._peer_ip):
            METRICS.connections_open.dec()
        super().connection_lost(error)


class StartError(Exception):
    """The relay cannot start; the message names the file or setting to fix."""


def _tls(config: RelayConfig) -> ReloadingContext | None:
    if config.tls is None:
        return None

    def reloaded(problem: str | None) -> None:
        if problem is None:
            system_log().info("tls_reloaded", cert=str(config.tls.cert_file) if config.tls else "")
        else:
            system_log().error("tls_reload_failed", error=problem)

    try:
        return ReloadingContext(config.tls.cert_file, config.tls.key_file, on_reload=reloaded)
    except (OSError, ssl.SSLError) as error:
        raise StartError(
            f"tls: cannot load {config.tls.cert_file} / {config.tls.key_file}: {error}"
        ) from None


def _users(config: RelayConfig) -> Users | None:
    if config.auth is None:
        return None
    try:
        return Users(
            config.auth.users_file,
            on_error=lambda problem: system_log().error("auth_users_unreadable", error=problem),
        )
    except UsersFileError as error:
        raise StartError(f"auth.usersFile: {error}") from None


def _log_loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    error = context.get("exception")
    system_log().error(
        "event_loop_error",
        message=context.get("message"),
        error=repr(error) if error is not None else None,
    )


async def run(
    config: RelayConfig,
    *,
    stop: asyncio.Event | None = None,
    listener: socket.socket | None = None,
    shard: Shard | None = None,
    source: reload.Source | None = None,
    handoff_fd: int | None = None,
    counts: SessionCounts | None = None,
) -> None:
    """Serve until ``stop`` is set (by SIGTERM/SIGINT when not given).

    Alone, the process owns the whole spool, its PID file and the metrics endpoint. As one of
    several workers (``listener`` and ``shard`` given by the supervisor in workers.py) it
    accepts on the shared socket and schedules only its shard of the spool; with
    ``handoff_fd`` (its inotify descriptor on the queue directory) it gives what it accepts
    to the next worker and schedules what the previous one gives it. ``counts``: the
    session counts shared by every worker (made by the supervisor before forking).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)  # until _serve's handlers are in
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_log_loop_errors)
    stop = stop or asyncio.Event()
    hostname = config.hostname or socket.getfqdn()
    logs.configure(config.logging, spool_dir=config.spool_dir, hostname=hostname)
    log = system_log()
    lock = None
    try:
        if listener is None:  # alone; a worker runs under its supervisor's lock
            try:
                lock = Spool(config.spool_dir).lock_exclusively()
            except SpoolInUse as error:
                raise StartError(str(error)) from None
        await _serve(
            config,
            hostname=hostname,
            stop=stop,
            listener=listener,
            shard=shard,
            source=source,
            handoff_fd=handoff_fd,
            counts=counts,
        )
    except StartError as error:
        log.error("start_failed", error=str(error))
        raise
    finally:
        if lock is not None:
            os.close(lock)
        logs.close()


async def _drain(server: asyncio.Server, sessions: _Sessions, scheduler: Scheduler) -> int:
    """Stop taking mail and let work in progress finish, within the graces; returns how many
    sessions had to be cut off."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SESSION_GRACE
    server.close()  # no new connections; /readyz answers 503 from now on
    for session in list(sessions.open):
        session.shut_down()
    stopping_delivery = asyncio.create_task(scheduler.stop(DELIVERY_GRACE))
    while sessions.open and loop.time() < deadline:  # noqa: ASYNC110 -- a bounded drain
        await asyncio.sleep(0.05)
    cut = len(sessions.open)
    for session in list(sessions.open):
        if session.transport is not None:
            session.transport.close()
    await stopping_delivery
    return cut


def _session_factory(
    live: Live[RelayConfig],
    *,
    hostname: str,
    spool: Spool,
    sessions: _Sessions,
    tls: ReloadingContext | None,
    users: Users | None,
) -> Callable[[], _TrackedSMTP]:
    """One aiosmtpd protocol per connection, sharing the relay's policy and state; each
    connection takes the settings current when it is made."""
    handler = RelayHandler(settings=live.current, hostname=hostname, spool=spool)
    handler.alone = lambda: len(sessions.open) == 1
    limiter = FailureLimiter()
    trusted: dict[str, Any] = {}

    def proxies(config: RelayConfig) -> list[Network]:
        """proxyProtocol.trustedNetworks of these settings, parsed once per version."""
        if trusted.get("config") is not config:
            trusted["config"] = config
            trusted["networks"] = parse_networks(config.proxy_protocol.trusted_networks)
        networks: list[Network] = trusted["networks"]
        return networks

    def factory() -> _TrackedSMTP:
        config = live.current()
        return _TrackedSMTP(
            handler,
            sessions=sessions,
            users=users,
            limiter=limiter,
            data_size_limit=config.max_message_size,
            hostname=config.hostname or hostname,
            ident="smtprelay",
            tls_context=tls.current() if tls is not None else None,
            auth_require_tls=True,
            enable_SMTPUTF8=True,
            timeout=config.limits.command_timeout,
            data_timeout=config.limits.data_timeout,
            errors_limit=config.limits.errors_per_session,
            proxies=proxies(config),
            loop=asyncio.get_running_loop(),
        )

    return factory


async def _listen(
    config: RelayConfig, listener: socket.socket | None, factory: Callable[[], _TrackedSMTP]
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if listener is not None:  # a worker: the supervisor's socket
        return await loop.create_server(factory, sock=listener)
    host, port = split_hostport(config.listen, 2525)
    return await loop.create_server(factory, host or None, port, reuse_address=True)


def _current(
    config: RelayConfig, *, hostname: str, source: reload.Source | None, supervised: bool
) -> tuple[Live[RelayConfig], Live[Setup], reload.ConfigWatcher | None]:
    """The live holders the stages read, and the watcher that swaps them (when the relay
    was started from a file it can re-read). A ``supervised`` worker that switches tells
    its supervisor (SIGHUP), which has every other worker look at once: the workers of one
    relay switch together, not each at its own poll up to a second apart."""
    live = Live(config)
    try:
        setup = Live(current.setup_for(config, hostname, current.credentials_of(config)))
    except current.CredentialsError as error:
        raise StartError(str(error)) from None
    if source is None:
        return live, setup, None
    supervisor = os.getppid() if supervised else 0
    watcher = current.watch(
        source,
        live=live,
        setup=setup,
        hostname=hostname,
        spool_dir=config.spool_dir,
        on_switched=(lambda: os.kill(supervisor, signal.SIGHUP)) if supervised else _nothing,
    )
    return live, setup, watcher


def _handle_signals(
    loop: asyncio.AbstractEventLoop,
    *,
    stop: asyncio.Event,
    scheduler: Scheduler,
    watcher: reload.ConfigWatcher | None,
) -> None:
    """SIGTERM/SIGINT stop, SIGUSR1 flushes the queue, SIGHUP looks at relay.yaml now."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: system_log().info("flush", due=scheduler.flush())
    )
    loop.add_signal_handler(signal.SIGHUP, watcher.check if watcher is not None else _nothing)
    # `queue flush` (SIGUSR1) or a reload (SIGHUP) may come while this process was starting:
    # they were held until now, when the schedule is loaded and the handlers are in place,
    # rather than killing us
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


def _nothing() -> None:
    return None


def _hand_off(fd: int | None, spool: Spool, scheduler: Scheduler) -> handoff.QueueWatch | None:
    """Give what this worker accepts to the next worker, and schedule what the previous
    one gives it, told by inotify (``fd``, opened by the supervisor)."""
    shard = spool.shard
    if fd is None or shard.count < 2:
        return None
    watch = handoff.attach(fd, arrived=scheduler.arrived, overflowed=scheduler.rescan)
    spool.accept_shard = Shard((shard.index + 1) % shard.count, shard.count)
    return watch


async def _serve(
    config: RelayConfig,
    *,
    hostname: str,
    stop: asyncio.Event,
    listener: socket.socket | None,
    shard: Shard | None,
    source: reload.Source | None,
    handoff_fd: int | None = None,
    counts: SessionCounts | None = None,
) -> None:
    alone = listener is None
    loop = asyncio.get_running_loop()
    log = system_log()
    tls = _tls(config)
    users = _users(config)
    live, setup, watcher = _current(config, hostname=hostname, source=source, supervised=not alone)

    spool = Spool(config.spool_dir, shard=shard)
    if alone:
        spool.remove_orphans()
        (config.spool_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    scheduler = Scheduler(spool=spool, setup=setup.current)
    watch = _hand_off(handoff_fd, spool, scheduler)
    recovered = scheduler.load()
    spool.subscribe(scheduler.notify)

    sessions = _Sessions(counts or SessionCounts(), lambda: live.current().limits)
    server = await _listen(
        config,
        listener,
        _session_factory(
            live, hostname=hostname, spool=spool, sessions=sessions, tls=tls, users=users
        ),
    )

    def ready() -> bool:
        return server.is_serving() and spool.probe_writable()

    def refresh() -> None:
        METRICS.queue_size.set(scheduler.queued)
        METRICS.oldest.set(oldest_age(spool.recent_census()[1], time.time()))
        METRICS.corrupt.set(spool.corrupt_count())

    http = None
    if alone:
        metrics_host, metrics_port = split_hostport(config.metrics_listen, 9090)
        http = await serve_http(
            metrics_host,
            metrics_port,
            ready=ready,
            refresh=refresh,
            config=lambda: current.config_state(watcher),
        )
    delivery = asyncio.create_task(scheduler.run())
    watching = asyncio.create_task(watcher.run()) if watcher is not None else None

    _handle_signals(loop, stop=stop, scheduler=scheduler, watcher=watcher)

    log.info(
        "started",
        listen=config.listen,
        metrics=config.metrics_listen,
        spool=str(config.spool_dir),
        recovered=recovered,
        hostname=hostname,
        log_target=config.logging.target,
        worker=None if shard is None else shard.index,
        tls=tls is not None,
        auth=users is not None,
        config=None if watcher is None else watcher.loaded.hash,
    )
    try:
        await stop.wait()
    finally:
        log.info("stopping", sessions=len(sessions.open))
        began = loop.time()
        if watching is not None:
            watching.cancel()
        cut = await _drain(server, sessions, scheduler)
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        for closing in (watch, http):
            if closing is not None:
                closing.close()
        for signum in (signal.SIGTERM, signal.SIGINT, *_HELD):
            loop.remove_signal_handler(signum)
        if alone:
            with contextlib.suppress(FileNotFoundError):
                (config.spool_dir / PID_FILE).unlink()
        log.info(
            "stopped",
            queued=spool.census()[0],
            sessions_cut=cut,
            seconds=round(loop.time() - began, 3),
        )
