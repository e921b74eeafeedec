"""The queue manager: which message is tried when, and what follows from each attempt.

Attempt 1 is made as soon as a message is spooled; a deferred message waits one queue-timer
interval for its next attempt, across restarts too. An in-memory heap of
due times keeps each wake-up's cost proportional to the messages due, not to the queue's
length. At most ``delivery.concurrency`` messages are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from smtprelay import bounce
from smtprelay.commands import Carried
from smtprelay.config import MailSettings, split_hostport
from smtprelay.deliver import Credentials, Policy, Result, Target, deliver
from smtprelay.dsn import MailOptions
from smtprelay.logs import mail_log, system_log
from smtprelay.metrics import METRICS
from smtprelay.route import MxResolver, ResolveFailure, Route, group_by_route
from smtprelay.scache import ConnectionCache
from smtprelay.spool import (
    Busy,
    Envelope,
    Incomplete,
    MessageFile,
    NotAQueueFile,
    QueueState,
    Spool,
    is_queue_id,
)


@dataclass(frozen=True)
class Setup:
    """What one delivery attempt works with; replaced whole when relay.yaml or a credentials
    file changes, and read once per attempt, so an attempt in flight keeps its own."""

    settings: MailSettings
    hostname: str
    resolver: MxResolver
    credentials: Mapping[Path, Credentials] = field(default_factory=dict)
    """By credentialsFile path (the gateway's, each route's)."""


class Scheduler:
    """Drives every spooled message to delivered or returned."""

    def __init__(
        self,
        *,
        spool: Spool,
        setup: Callable[[], Setup],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._setup = setup
        self._clock = clock
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._active: dict[str, asyncio.Task[float | None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        # sessions to gateways and MX hosts outlive one message (Postfix's scache)
        self.connections = ConnectionCache(max_idle=setup().settings.delivery.concurrency)

    @property
    def queued(self) -> int:
        return len(self._due) + len(self._active)

    def oldest_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def load(self) -> int:
        """Take every message in the spool into the schedule at its due time; returns how
        many. Messages never tried are due at once; deferred ones keep their place, so a
        restart neither spends an attempt of every message nor delays any."""
        for entry in self._spool.scan():
            if entry.id not in self._active:
                self._due[entry.id] = entry.due
        self._rebuild()
        return len(self._due)

    def notify(self, queue_id: str) -> None:
        """A new message was spooled: its first attempt is due now, if it is this shard's."""
        if self._spool.shard.owns(queue_id):
            self._push(queue_id, 0.0)

    def arrived(self, name: str) -> None:
        """A file was committed in the queue directory (handoff.py): a message of this shard
        that another worker accepted, or one this worker knows already (pushed again,
        harmlessly: an attempt of a message already gone ends at once)."""
        queue_id = name.removesuffix(".eml")
        if queue_id != name and is_queue_id(queue_id) and queue_id not in self._due:
            self.notify(queue_id)

    def rescan(self) -> None:
        """Events were lost (inotify's queue overflowed): take in whatever the spool holds
        of this shard that the schedule does not."""
        for entry in self._spool.scan():
            if entry.id not in self._due and entry.id not in self._active:
                self._push(entry.id, entry.due)

    def flush(self) -> int:
        """Make every spooled message due now (``queue flush``), including any that another
        process (``queue bounce``) put in the spool; returns how many."""
        owns = self._spool.shard.owns
        count = 0
        for queue_id in self._spool.names():
            if owns(queue_id) and queue_id not in self._active:
                self._due[queue_id] = 0.0
                count += 1
        self._rebuild()
        return count

    def _push(self, queue_id: str, due: float) -> None:
        if queue_id in self._active:
            return
        self._due[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))
        if len(self._heap) > 2 * len(self._due) + 1024:
            # superseded entries (a flush, a deferral) would otherwise stay until their old
            # due time: rebuild, so the heap follows the queue's length, not its history
            self._rebuild()
        else:
            self._wake.set()

    def _rebuild(self) -> None:
        """The heap anew from the due times: one entry a message, in linear time."""
        self._heap = [(when, queue_id) for queue_id, when in self._due.items()]
        heapq.heapify(self._heap)
        self._wake.set()

    async def run(self) -> None:
        """Start attempts as they fall due, until `stop`."""
        while not self._stopping:
            limit = self._setup().settings.delivery.concurrency
            now = self._clock()
            while self._heap and self._heap[0][0] <= now and len(self._active) < limit:
                due, queue_id = heapq.heappop(self._heap)
                if self._due.get(queue_id) != due:
                    continue  # superseded by a later push
                del self._due[queue_id]
                task = asyncio.create_task(self._attempt(queue_id))
                self._active[queue_id] = task
                task.add_done_callback(functools.partial(self._finished, queue_id))
            timeout = None
            if self._heap and len(self._active) < limit:
                timeout = max(0.0, self._heap[0][0] - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _finished(self, queue_id: str, task: asyncio.Task[float | None]) -> None:
        self._active.pop(queue_id, None)
        if not task.cancelled() and (due := task.result()) is not None:
            self._push(queue_id, due)
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Start nothing new; give attempts in flight ``grace`` seconds, then cancel them.

        A cancelled attempt leaves its message in the spool, to be tried again after restart.
        """
        self._stopping = True
        self._wake.set()
        active = list(self._active.values())
        if active:
            _, pending = await asyncio.wait(active, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.connections.close()

    async def _attempt(self, queue_id: str) -> float | None:
        """One attempt; returns when the message is due again, or None when it is done."""
        try:
            with self._spool.locked(queue_id) as present:  # queue commands wait for us
                return await self._attempt_unguarded(queue_id) if present else None
        except Busy:
            return self._clock() + 1.0  # a queue command holds it; look again shortly
        except NotAQueueFile as error:  # a symlink, FIFO or directory: never read through
            self._quarantine(queue_id, str(error))
            return None
        except asyncio.CancelledError:
            raise
        except Exception as error:  # one broken message must not stop the queue
            system_log().exception("attempt_crashed", queue_id=queue_id, error=str(error))
            return self._count_crashed(queue_id)

    def _count_crashed(self, queue_id: str) -> float | None:
        """An attempt that crashed still counts toward ``tries``; after the last one the
        message is set aside (``corrupt/``) rather than tried forever."""
        try:
            if not self._spool.contains(queue_id):
                return None
            state = self._spool.load_state(queue_id)
            attempts = state.attempts + 1
            if attempts >= self._setup().settings.delivery.tries:
                self._quarantine(queue_id, "every attempt crashed")
                return None
            due = self._clock() + self._setup().settings.delivery.queue_timer
            self._spool.defer(queue_id, replace(state, attempts=attempts), due)
        except OSError as error:
            system_log().error("attempt_not_counted", queue_id=queue_id, error=str(error))
            return self._clock() + self._setup().settings.delivery.queue_timer
        return due

    def _quarantine(self, queue_id: str, reason: str) -> None:
        where = self._spool.quarantine(queue_id)
        system_log().error("message_quarantined", queue_id=queue_id, reason=reason, path=str(where))

    def _open(self, queue_id: str) -> tuple[Envelope, MessageFile] | None:
        try:
            return self._spool.open_message(queue_id)
        except FileNotFoundError:
            return None  # deleted by an administrator meanwhile
        except Incomplete as error:  # a crash cut its receipt short: never answered 250
            if error.young:  # or its writer is about to lock it: look again shortly
                raise Busy(queue_id) from None
            self._spool.remove(queue_id)
            system_log().warning("incomplete_removed", queue_id=queue_id, reason=str(error))
            return None
        except (ValueError, KeyError, TypeError) as error:  # torn or foreign: never retried
            self._quarantine(queue_id, f"unreadable: {error}")
            return None

    async def _attempt_unguarded(self, queue_id: str) -> float | None:
        if (opened := self._open(queue_id)) is None:
            return None
        envelope, data = opened
        setup = self._setup()  # this attempt's settings, whatever a reload does meanwhile
        settings = setup.settings
        state = self._spool.load_state(queue_id)
        attempt = state.attempts + 1
        pending = state.pending(envelope)
        groups = group_by_route(settings, pending, attempt, envelope.sender)
        started = self._clock()
        outcomes = await asyncio.gather(
            *(
                self._attempt_route(setup, route, recipients, envelope, data)
                for route, recipients in groups.items()
            )
        )
        last_try = attempt >= settings.delivery.tries
        delivered: set[str] = set()
        failures: list[bounce.Failure] = []
        delayed: list[bounce.Failure] = []
        relayed: list[bounce.Failure] = []  # NOTIFY=SUCCESS to a hop without DSN
        for route, results in zip(groups, outcomes, strict=True):
            for recipient, result in results.items():
                outcome = result.outcome
                if outcome == "deferred" and last_try:
                    outcome = "failed"
                self._log_attempt(envelope, attempt, route, recipient, result, outcome)
                METRICS.attempts.labels(route=route.kind, outcome=outcome).inc()
                report = bounce.Failure(
                    recipient=recipient,
                    status=bounce.status_for(result.code, result.text),
                    diagnostic=f"{result.code} {result.text}",
                    remote_mta=result.name or result.host,
                    action={"delivered": "relayed", "deferred": "delayed"}.get(outcome, outcome),
                )
                if outcome == "delivered":
                    delivered.add(recipient)
                    METRICS.latency.observe(self._clock() - envelope.received)
                    if not result.dsn and envelope.options_of(recipient).wants("SUCCESS"):
                        relayed.append(report)
                else:
                    (failures if outcome == "failed" else delayed).append(report)
        for notices in (failures, relayed):
            if notices:
                await self._return_to_sender(setup.hostname, envelope, data, notices)
        warn = delayed and self._warning_due(settings, envelope, state, started)
        if warn:
            await self._return_to_sender(setup.hostname, envelope, data, delayed)
        new_state = replace(
            state,
            attempts=attempt,
            delivered=state.delivered | delivered,
            failed=state.failed | {f.recipient for f in failures},
            warned=state.warned or bool(warn),
        )
        if not self._spool.contains(queue_id):
            return None
        if new_state.pending(envelope):
            due = started + settings.delivery.queue_timer
            # an in-place write and a utime, page cache only (~15 us): cheaper here than
            # the thread hop it would take
            self._spool.defer(queue_id, new_state, due)
            return due
        await asyncio.to_thread(self._spool.remove, queue_id, release=True)
        return None

    async def _targets(
        self, resolver: MxResolver, route: Route
    ) -> tuple[Target, ...] | ResolveFailure:
        """The hosts of a route in order, each expanded to its addresses. A relay host's
        name goes through the resolver's search list (``smarthost.mail``); one that does not
        resolve is skipped, so a dead first gateway does not block the second."""
        if route.kind == "direct":
            resolved = await resolver.resolve(route.name)
            if isinstance(resolved, ResolveFailure):
                return resolved
            return tuple(
                Target(name=name or address, address=address, port=route.port)
                for name, address in resolved.targets()
            )
        targets: list[Target] = []
        failures: list[ResolveFailure] = []
        for spec in route.hosts:
            host, port = split_hostport(spec, 25)
            addresses = await resolver.addresses(host, search=True)
            if isinstance(addresses, ResolveFailure):
                failures.append(addresses)
                continue
            targets.extend(Target(name=host, address=a, port=port) for a in addresses)
        if targets or not failures:
            return tuple(targets)
        # A relay host that does not resolve is our configuration's fault, not the
        # recipient's: defer, never bounce.
        return ResolveFailure(False, "4" + failures[0].status[1:], failures[0].reason)

    async def _attempt_route(
        self,
        setup: Setup,
        route: Route,
        recipients: tuple[str, ...],
        envelope: Envelope,
        data: MessageFile,
    ) -> dict[str, Result]:
        """Whatever goes wrong on one route becomes its recipients' outcome, counted toward
        ``tries``; the other routes' outcomes in the same attempt are kept."""
        try:
            return await self._try_route(setup, route, recipients, envelope, data)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            system_log().exception(
                "route_crashed", queue_id=envelope.id, destination=route.name, error=str(error)
            )
            reason = f"4.3.0 local error in delivery: {type(error).__name__}: {error}"
            return dict.fromkeys(recipients, Result("deferred", 451, reason))

    async def _try_route(
        self,
        setup: Setup,
        route: Route,
        recipients: tuple[str, ...],
        envelope: Envelope,
        data: MessageFile,
    ) -> dict[str, Result]:
        targets = await self._targets(setup.resolver, route)
        if isinstance(targets, ResolveFailure):
            code = 550 if targets.permanent else 451
            result = Result(
                "failed" if targets.permanent else "deferred",
                code,
                f"{targets.status} {targets.reason}",
            )
            return dict.fromkeys(recipients, result)
        credentials = None
        if route.credentials_file is not None:
            credentials = setup.credentials.get(route.credentials_file)
            if credentials is None:
                reason = f"4.7.0 no credentials loaded from {route.credentials_file}"
                return dict.fromkeys(recipients, Result("deferred", 451, reason))
        policy = Policy(
            tls=route.tls,
            implicit_tls=route.implicit_tls,
            ca_file=route.ca_file,
            credentials=credentials,
        )
        return await deliver(
            targets=targets,
            policy=policy,
            helo=setup.hostname,
            sender=envelope.sender,
            recipients=recipients,
            data=data,
            carried=Carried(
                options=envelope.options,
                recipients={r: envelope.options_of(r) for r in recipients},
            ),
            cache=self.connections,
        )

    def _warning_due(
        self, settings: MailSettings, envelope: Envelope, state: QueueState, now: float
    ) -> bool:
        """delivery.delayWarning: once per message, after it has waited that long."""
        after = settings.delivery.delay_warning
        return bool(after) and not state.warned and now - envelope.received >= after

    async def _return_to_sender(
        self,
        hostname: str,
        envelope: Envelope,
        data: MessageFile,
        failures: list[bounce.Failure],
    ) -> None:
        kind = {"delayed": "DELAY", "relayed": "SUCCESS"}.get(failures[0].action, "FAILURE")
        unwanted = [f for f in failures if not envelope.options_of(f.recipient).wants(kind)]
        if not envelope.sender or unwanted:
            mail_log().warning(
                "bounce_suppressed",
                queue_id=envelope.id,
                reason="null sender" if not envelope.sender else f"NOTIFY without {kind}",
                recipients=[f.recipient for f in (failures if not envelope.sender else unwanted)],
            )
        failures = [f for f in failures if f not in unwanted]
        if not envelope.sender or not failures:
            return
        report = bounce.build_report(
            queue_id=envelope.id,
            sender=envelope.sender,
            failures=[
                replace(f, original_recipient=envelope.options_of(f.recipient).orcpt)
                for f in failures
            ],
            headers=bounce.original_headers(data.head()),
            hostname=hostname,
            arrival=envelope.received,
            now=self._clock(),
            envid=envelope.options.envid,
            full=_returnable(data) if envelope.options.ret == "FULL" else None,
        )
        returned = await self._spool.enqueue(
            sender="",
            recipients=(envelope.sender,),
            data=report,
            client="bounce",
            options=MailOptions(smtputf8=not envelope.sender.isascii()),
        )
        action = failures[0].action
        if action == "failed":
            METRICS.bounced.inc(len(failures))
        mail_log().info(
            {"delayed": "delay_notice", "relayed": "relay_notice"}.get(action, "bounced"),
            queue_id=envelope.id,
            report_id=returned.id,
            sender=envelope.sender,
            recipients=[f.recipient for f in failures],
        )

    def _log_attempt(
        self,
        envelope: Envelope,
        attempt: int,
        route: Route,
        recipient: str,
        result: Result,
        outcome: str,
    ) -> None:
        mail_log().info(
            "delivery",
            queue_id=envelope.id,
            sender=envelope.sender,
            recipient=recipient,
            route=route.kind,
            destination=route.name,
            host=result.host,
            host_name=result.name,
            tls=result.tls,
            attempt=attempt,
            reply=f"{result.code} {result.text}",
            outcome=outcome,
        )


RETURN_LIMIT = 1024 * 1024  # RET=FULL returns messages up to this size; larger: headers only


def _returnable(data: MessageFile) -> bytes | None:
    """The whole message for a RET=FULL report, when small enough to build one in memory
    (as Postfix's bounce_size_limit; RFC 3461 §4.3 allows returning headers only)."""
    return data.head(RETURN_LIMIT) if data.size <= RETURN_LIMIT else None
