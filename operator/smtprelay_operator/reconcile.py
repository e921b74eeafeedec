"""One reconcile of one SmtpRelay: apply what `render` makes, in order, and report status.

Level-triggered and idempotent: it renders the whole desired state from the SmtpRelay as it
is now and server-side-applies it, so a restart, a repeated trigger or a resync all converge
on the same objects and an unchanged spec changes nothing (no write reaches etcd). Deletion
needs no code and no finalizer: the children carry ownerReferences and the garbage
collector removes them (all but a retained spool PVC).

Runs in a worker thread (the Kubernetes client is synchronous); the work queue makes sure
one SmtpRelay is never reconciled by two workers at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from kubernetes.client import ApiException
from smtprelay.config import ConfigError, parse_config

from smtprelay_operator import api, policy, pruning, relayconfig, render, status
from smtprelay_operator.applying import Applying, apply_stages
from smtprelay_operator.children import Children
from smtprelay_operator.events import Involved, Recorder
from smtprelay_operator.kube import CONFLICT, Kube
from smtprelay_operator.relaycache import RelayCache, Renders

_log = logging.getLogger(__name__)
_STATUS_WRITE_ATTEMPTS = 5

Object = dict[str, Any]


def _generation(meta: Mapping[str, Any]) -> int:
    return int(meta.get("generation") or 0)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """What every reconcile shares."""

    kube: Kube
    recorder: Recorder
    defaults: render.OperatorDefaults
    children: Children = dataclasses.field(default_factory=Children)
    relays: RelayCache = dataclasses.field(default_factory=RelayCache)
    renders: Renders = dataclasses.field(default_factory=Renders)
    reapply_after: float = 600.0
    """An unchanged child the watch reports untouched is applied again only after this
    long (the resync is longer, so a resync applies everything)."""
    config_url: str = ""
    """Where to ask each relay which relay.yaml it runs ({name}, {namespace} filled in);
    empty: not asked, and Ready follows the Deployment alone."""
    known: set[str] = dataclasses.field(default_factory=set)
    """uids reconciled at least once by this process (logged once, at INFO)."""
    side: concurrent.futures.Executor | None = None
    """Threads for the applies that go alongside a reconcile's own (one stage's objects);
    None: one after the other."""


@functools.lru_cache(maxsize=256)
def _validate(relay_yaml: str) -> str | None:
    """The relay's own verdict on a rendered relay.yaml; None when it would start.

    Kept for the last few hundred relay.yamls: every reconcile renders, most render the
    same as the last time, and parsing is most of a no-op reconcile's CPU.
    """
    try:
        parse_config(yaml.safe_load(relay_yaml))
    except ConfigError as error:
        return "; ".join(error.problems)
    return None


Observe = Callable[[Mapping[str, Any]], "status.Observed | None"]


def write_status(ctx: Context, relay: Mapping[str, Any], observe: Observe) -> dict[str, Any] | None:
    """Compute the status from ``relay`` and write it unless it is already so.

    The write is conditional on ``relay``'s resourceVersion, so two writers cannot
    interleave a stale status over a newer one, nor can a stale ``relay`` (the watch's copy)
    overwrite a newer status: on conflict the SmtpRelay is read afresh and the status
    computed again.
    """
    meta = relay["metadata"]
    current: Mapping[str, Any] | None = relay
    for _ in range(_STATUS_WRITE_ATTEMPTS):
        if current is None or current["metadata"].get("uid") != meta.get("uid"):
            return None
        observed = observe(current)
        if observed is None:
            return None
        previous = current.get("status") or {}
        new = status.compute(observed, previous=previous.get("conditions") or [], now=_now())
        if all(previous.get(key) == value for key, value in new.items()):
            return new
        try:
            written = ctx.kube.replace_status(current, new)
        except ApiException as error:
            if error.status != CONFLICT:
                raise
            current = ctx.kube.get(
                api.API_VERSION, api.KIND, namespace=meta["namespace"], name=meta["name"]
            )
            continue
        ctx.relays.replaced(current, written)
        return new
    return None


def _available(deployment: Mapping[str, Any] | None) -> bool:
    return int(((deployment or {}).get("status") or {}).get("availableReplicas") or 0) > 0


def _observer(
    ctx: Context,
    *,
    generation: int,
    config_hash: str,
    restart_hash: str | None,
    failure: status.Failure | None,
    deployment: Mapping[str, Any] | None = None,
) -> Observe:
    """``deployment``: what this reconcile's apply of it returned, if it applied it."""
    fresh = deployment

    def observe(current: Mapping[str, Any]) -> status.Observed:
        nonlocal fresh
        meta = current["metadata"]
        deployment = fresh or ctx.children.deployment(meta["namespace"], meta["name"])
        if deployment is None:
            deployment = ctx.kube.get(
                "apps/v1", "Deployment", namespace=meta["namespace"], name=meta["name"]
            )
        fresh = None  # on a conflict, what the watch says by then
        running = None
        found = failure
        if ctx.config_url and failure is None and _available(deployment):
            url = relayconfig.url_for(
                ctx.config_url, name=meta["name"], namespace=meta["namespace"]
            )
            running, refused, problems = relayconfig.running(url)
            if refused == config_hash and running.hash != config_hash:
                found = status.Failure(
                    reason="ConfigRefused",
                    message="the relay refused this relay.yaml: " + "; ".join(problems),
                    stalled=True,
                )
        return status.Observed(
            generation=generation,
            config_hash=config_hash,
            restart_hash=restart_hash,
            deployment=deployment,
            failure=found,
            running=running,
        )

    return observe


def _refusal(ctx: Context, namespace: str, spec: Mapping[str, Any]) -> policy.Refusal | None:
    allowed = ctx.defaults.allowed_images or policy.default_allowed_images(ctx.defaults.relay_image)
    refusal = policy.image_refusal(spec, allowed)
    if refusal is not None:
        return refusal
    for field, secret in policy.secret_references(spec):
        refusal = policy.secret_refusal(field, secret, ctx.kube.secret_labels(namespace, secret))
        if refusal is not None:
            return refusal
    return None


def reconcile(
    ctx: Context, namespace: str, name: str, *, urgent: bool = False
) -> bool | float | None:
    """Bring one SmtpRelay's objects and status up to date.

    Returns True when settled, False when something failed and should be retried with
    backoff, a number of seconds to look again after (waiting for the relay to take the new
    relay.yaml), None when the SmtpRelay no longer exists.

    ``urgent``: the pass a new or changed SmtpRelay gets before the queue's other work.
    When its generation is not yet all applied, it applies only what the relay pod needs
    (``Rendered.pod_stages``) and, if that went through, returns `DEFERRED`: the Services,
    the Applied Event and the status follow in the next pass, behind the other new
    SmtpRelays' pods. During a burst of creates a worker then spends three requests on each
    new SmtpRelay instead of seven to ten, and keeps pace. A failure is reported at once.
    """
    relay = ctx.relays.get(namespace, name) or ctx.kube.get(
        api.API_VERSION, api.KIND, namespace=namespace, name=name
    )
    if relay is None or relay["metadata"].get("deletionTimestamp"):
        ctx.children.forget(namespace, render.child_names(name))
        return None
    meta = relay["metadata"]
    involved = Involved.of(relay)
    generation = _generation(meta)
    known = relay.get("status") or {}
    caught_up = known.get("observedGeneration") == generation and "configHash" in known
    rendered = ctx.renders.of(relay, ctx.defaults)
    applied_hash = str(known.get("configHash") or rendered.config_hash)
    applied_restart = rendered.restart_hash

    problem = _validate(rendered.relay_yaml)
    if problem is not None:
        failure = status.Failure(reason="InvalidConfig", message=problem, stalled=True)
        return _fail(ctx, relay, involved, generation, applied_hash, failure, settled=True)
    refusal = _refusal(ctx, namespace, relay.get("spec") or {})
    if refusal is not None:
        # Nothing is applied: the relay pod must not mount what it may not use. A Secret
        # may be labelled or created later: checked again with backoff (one cheap GET).
        failure = status.Failure(
            reason=refusal.reason,
            message=refusal.text(),
            stalled=refusal.reason != "SecretNotFound",
        )
        settled = refusal.reason == "ImageNotAllowed"  # only a new spec can change that
        return _fail(ctx, relay, involved, generation, applied_hash, failure, settled=settled)

    changed = not caught_up or known.get("configHash") != rendered.config_hash
    first = not known and generation == 1 and not _deployment_known(ctx, namespace, name)
    applying = apply_stages(
        ctx, rendered.pod_stages(first=first), involved, caught_up=caught_up, into=Applying()
    )
    if urgent and changed and applying.sent and not applying.failures:
        return DEFERRED
    apply_stages(ctx, rendered.other_stages(), involved, caught_up=caught_up, into=applying)
    if changed and known:  # applied before: what its old spec asked for may be unwanted now
        pruning.remove_unwanted(ctx.kube, relay, rendered.monitoring)
    failures, deployment = applying.failures, applying.deployment
    if not applying.config_failed:
        applied_hash = rendered.config_hash
    if failures:
        failure = status.Failure(reason="ApplyFailed", message="; ".join(failures))
        return _fail(ctx, relay, involved, generation, applied_hash, failure, settled=False)

    if changed:
        spec = relay.get("spec") or {}
        ctx.recorder.record(
            involved,
            kind="Normal",
            reason="Applied",
            message=f"generation {generation}: config {rendered.config_hash[:12]}, "
            f"{render.desired_replicas(spec)} replica(s)",
        )
        _log.info(
            "%s/%s: applied generation %s (config %s)",
            namespace,
            name,
            generation,
            rendered.config_hash[:12],
        )
    written = write_status(
        ctx,
        relay,
        _observer(
            ctx,
            generation=generation,
            config_hash=applied_hash,
            restart_hash=applied_restart,
            failure=None,
            deployment=deployment,
        ),
    )
    if meta["uid"] not in ctx.known:
        ctx.known.add(meta["uid"])
        _log.info("%s/%s: reconciled %s (generation %s)", namespace, name, name, generation)
    if written is not None and _waiting_for_relay(written):
        return CONFIG_POLL  # look again soon: nothing else will say when the relay switched
    return True


def _deployment_known(ctx: Context, namespace: str, name: str) -> bool:
    """Whether the watch or an apply has ever mentioned this SmtpRelay's Deployment."""
    known, state = ctx.children.before_apply(("Deployment", namespace, name))
    return known and state is not None


CONFIG_POLL = 5.0
DEFERRED = 0.0
"""Look again as soon as the urgent work is done (the queue puts it behind urgent keys)."""


def _waiting_for_relay(computed: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == status.READY and c.get("reason") == "ConfigPending"
        for c in computed.get("conditions") or []
    )


def _fail(
    ctx: Context,
    relay: Mapping[str, Any],
    involved: Involved,
    generation: int,
    applied_hash: str,
    failure: status.Failure,
    *,
    settled: bool,
) -> bool:
    """One counted Warning Event and the failure in the status; ``settled`` for a spec
    that retrying cannot fix (it comes back with the next change or resync)."""
    _log.warning(
        "%s/%s: %s: %s", involved.namespace, involved.name, failure.reason, failure.message
    )
    ctx.recorder.record(involved, kind="Warning", reason=failure.reason, message=failure.message)
    write_status(
        ctx,
        relay,
        _observer(
            ctx,
            generation=generation,
            config_hash=applied_hash,
            restart_hash=None,
            failure=failure,
        ),
    )
    return settled
