"""kopf handlers: watch SmtpRelays and their children, and feed the work queue.

kopf does the watching (list+watch with label selectors, reconnects, re-lists); every
event only names the SmtpRelay concerned, and `workqueue.WorkQueue` workers reconcile it
(`reconcile.reconcile`) with per-key backoff on failure and a periodic resync. No kopf
change-handler state is kept on the SmtpRelay (no progress or last-handled annotations, no
finalizer): see operator/README.md for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from smtprelay_operator import api, metrics, reconcile
from smtprelay_operator.events import Recorder
from smtprelay_operator.kube import Kube, load_api_client
from smtprelay_operator.workqueue import Backoff, WorkQueue

_log = logging.getLogger(__name__)
_CHILD_FILTER = {api.MANAGED_BY_LABEL: api.MANAGED_BY, api.NAME_LABEL: "smtprelay"}
_CHILD_RESOURCES = (
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("", "v1", "persistentvolumeclaims"),
    ("apps", "v1", "deployments"),
)
DEFAULT_RESYNC = 900.0
DEFAULT_WORKERS = 8
# An unchanged child nobody touched is applied again after this share of the resync
# interval, so the resync (0.9 to 1.1 of it after the last reconcile) re-applies all.
REAPPLY_SHARE = 0.8

RelayKey = tuple[str, str]  # (namespace, name)


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf builds one (a deep copy of the body) on every event for its
    change handlers, and this operator has none, only event handlers."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Watch with server-side filters, post our own Events, start the reconcile workers."""
    # The Events posted are the recorder's, deduplicated; kopf's own (one per log line at
    # WARNING and above, a new one for every retry) would be a storm on a stuck apply.
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = NoDiffBase()
    # Filter children on the server: watching every ConfigMap in the cluster to pick out
    # ours would make idle cost grow with everything else in the cluster.
    selector = ",".join(f"{key}={value}" for key, value in sorted(_CHILD_FILTER.items()))
    for resource in _CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = selector
    # Given namespaces, kopf needs no cluster-wide scans of CRDs and namespaces, which a
    # namespaced install (Roles only) may not do: without this it retries them for a minute.
    if getattr(memo, "namespaced", False):
        settings.scanning.disabled = True
    workers = getattr(memo, "workers", DEFAULT_WORKERS)
    resync = getattr(memo, "resync", DEFAULT_RESYNC)
    # A connection for each worker and for each apply alongside a worker's (`applying`: up
    # to two, as a first apply sends ConfigMap, PVC and Deployment side by side).
    kube = getattr(memo, "kube", None) or Kube(load_api_client(connections=3 * workers + 2))
    memo.side = ThreadPoolExecutor(max_workers=2 * workers, thread_name_prefix="apply")
    memo.context = reconcile.Context(
        side=memo.side,
        kube=kube,
        recorder=Recorder(kube, component=api.FIELD_MANAGER, instance=socket.gethostname()),
        defaults=memo.defaults,
        config_url=getattr(memo, "config_url", ""),
        reapply_after=resync * REAPPLY_SHARE,
    )
    queue: WorkQueue[RelayKey] = WorkQueue(
        backoff=Backoff(base=getattr(memo, "backoff_base", 1.0), cap=300.0),
        resync=resync,
    )
    memo.queue = queue
    address = getattr(memo, "metrics_listen", "")
    if address and not getattr(memo, "metrics_served", False):
        metrics.serve(address)
        memo.metrics_served = True
    # Their own threads: asyncio's default executor has min(32, CPUs + 4) threads, 6 on a
    # 2-CPU node, which silently capped 8 workers at 6 reconciles at once.
    memo.executor = reconcile_executor(workers)
    work = worker(memo.context, queue, memo.executor)
    memo.worker_task = asyncio.create_task(queue.run(work, workers=workers))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "worker_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for name in ("executor", "side"):
        executor = getattr(memo, name, None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def reconcile_executor(workers: int) -> ThreadPoolExecutor:
    """One thread per worker: a reconcile blocks its thread on the API server."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")


def worker(
    context: reconcile.Context, queue: WorkQueue[RelayKey], executor: ThreadPoolExecutor
) -> Any:
    async def work(key: RelayKey, urgent: bool) -> bool | float | None:
        namespace, name = key
        metrics.QUEUED.set(queue.waiting)
        loop = asyncio.get_running_loop()
        run = functools.partial(reconcile.reconcile, context, namespace, name, urgent=urgent)
        try:
            with metrics.DURATION.time():
                result = await loop.run_in_executor(executor, run)
        except Exception:
            metrics.RECONCILES.labels(outcome="failed").inc()
            _log.exception("%s/%s: reconcile failed; retrying with backoff", namespace, name)
            raise
        metrics.RECONCILES.labels(outcome=metrics.outcome_of(result)).inc()
        return result

    return work


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def relay_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A new, changed or resumed SmtpRelay; status-only changes (our own writes) are noted
    in the cache but queue nothing."""
    raw = event.get("object") or {}
    deleted = event.get("type") == "DELETED"
    key = memo.context.relays.note(raw, deleted=deleted)
    meta = raw.get("metadata") or {}
    known = raw.get("status") or {}
    if event.get("type") == "MODIFIED" and known.get("observedGeneration") == meta.get(
        "generation"
    ):
        return
    memo.queue.add(key, urgent=True)


@kopf.on.event(*_CHILD_RESOURCES[0], labels=_CHILD_FILTER)
@kopf.on.event(*_CHILD_RESOURCES[1], labels=_CHILD_FILTER)
@kopf.on.event(*_CHILD_RESOURCES[2], labels=_CHILD_FILTER)
@kopf.on.event(*_CHILD_RESOURCES[3], labels=_CHILD_FILTER)
async def child_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A child changed, was deleted or rolled: its SmtpRelay is reconciled (and so repaired,
    with backoff if the repair fails). The echo of the operator's own apply is not news."""
    raw = event.get("object") or {}
    meta = raw.get("metadata") or {}
    namespace = meta.get("namespace")
    relay_name = (meta.get("labels") or {}).get(api.INSTANCE_LABEL)
    kind = str(raw.get("kind") or "")
    if not namespace or not relay_name or not kind:
        return
    child = (kind, str(namespace), str(meta.get("name")))
    deleted = event.get("type") == "DELETED"
    if memo.context.children.watched(child, None if deleted else raw):
        memo.queue.add((str(namespace), str(relay_name)))
