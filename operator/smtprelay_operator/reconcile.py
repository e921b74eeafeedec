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

import dataclasses
import datetime
import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from kubernetes.client import ApiException
from smtprelay.config import ConfigError, parse_config

from smtprelay_operator import api, policy, relayconfig, render, status
from smtprelay_operator.events import Involved, Recorder
from smtprelay_operator.kube import CONFLICT, NOT_FOUND, Kube

_log = logging.getLogger(__name__)
_STATUS_WRITE_ATTEMPTS = 5

ChildKey = tuple[str, str, str]  # (kind, namespace, name)
Object = dict[str, Any]


class Seen:
    """What the watch last reported of each child: (resourceVersion, generation), or None
    once deleted. Lets a reconcile tell a repair from a no-op without reading the child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[ChildKey, tuple[str, int] | None] = {}

    def note(self, key: ChildKey, body: Mapping[str, Any] | None) -> None:
        meta = (body or {}).get("metadata") or {}
        value = None if body is None else (str(meta.get("resourceVersion")), _generation(meta))
        with self._lock:
            self._children[key] = value

    def get(self, key: ChildKey) -> tuple[bool, tuple[str, int] | None]:
        """(known, value): known False when the watch never mentioned the child."""
        with self._lock:
            return key in self._children, self._children.get(key)


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
    seen: Seen = dataclasses.field(default_factory=Seen)
    config_url: str = ""
    """Where to ask each relay which relay.yaml it runs ({name}, {namespace} filled in);
    empty: not asked, and Ready follows the Deployment alone."""
    known: set[str] = dataclasses.field(default_factory=set)
    """uids reconciled at least once by this process (logged once, at INFO)."""


def _api_message(error: ApiException) -> str:
    """The API server's own message (it names the field), not the whole response body."""
    try:
        return str(json.loads(error.body or "{}").get("message") or error.body)
    except ValueError:
        return str(error.body)


def _validate(rendered: render.Rendered) -> str | None:
    """The relay's own verdict on the rendered relay.yaml; None when it would start."""
    try:
        parse_config(yaml.safe_load(rendered.relay_yaml))
    except ConfigError as error:
        return "; ".join(error.problems)
    return None


Observe = Callable[[Mapping[str, Any]], "status.Observed | None"]


def write_status(kube: Kube, relay: Mapping[str, Any], observe: Observe) -> dict[str, Any] | None:
    """Compute the status from a fresh read and write it unless it is already so.

    The write is conditional on the resourceVersion read, so two writers cannot interleave
    a stale status over a newer one; on conflict the read and computation are repeated.
    """
    meta = relay["metadata"]
    for _ in range(_STATUS_WRITE_ATTEMPTS):
        current = kube.get(
            api.API_VERSION, api.KIND, namespace=meta["namespace"], name=meta["name"]
        )
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
            kube.replace_status(current, new)
        except ApiException as error:
            if error.status != CONFLICT:
                raise
            continue
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
) -> Observe:
    def observe(current: Mapping[str, Any]) -> status.Observed:
        meta = current["metadata"]
        deployment = ctx.kube.get(
            "apps/v1", "Deployment", namespace=meta["namespace"], name=meta["name"]
        )
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


def _key(obj: Mapping[str, Any]) -> ChildKey:
    meta = obj["metadata"]
    return (str(obj["kind"]), str(meta["namespace"]), str(meta["name"]))


def _repaired(ctx: Context, before: tuple[bool, tuple[str, int] | None], after: Object) -> bool:
    """Whether applying put back something changed or deleted outside the operator."""
    known, value = before
    if not known:
        return False  # first sight (operator start): nothing to compare with
    if value is None:
        return True  # the watch saw it deleted
    meta = after["metadata"]
    if after["kind"] == "Deployment":  # status updates do not count, spec changes do
        return _generation(meta) != value[1]
    return str(meta.get("resourceVersion")) != value[0]


def _apply_children(
    ctx: Context, rendered: render.Rendered, involved: Involved, *, caught_up: bool
) -> list[str]:
    """Apply the ConfigMap first and the Deployment last, and only if the ConfigMap went
    through: a pod must never roll onto a hash whose relay.yaml is not in place."""
    failures: list[str] = []
    config_failed = False
    for obj in rendered.objects():
        target = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "Deployment" and config_failed:
            failures.append(f"{target} not applied: its ConfigMap was not")
            continue
        before = ctx.seen.get(_key(obj))
        try:
            after = ctx.kube.apply(obj)
        except ApiException as error:
            if error.status == NOT_FOUND and obj["apiVersion"].startswith("monitoring.coreos"):
                failures.append(
                    f"applying {target}: the cluster has no {obj['kind']} kind; install "
                    "prometheus-operator's CRDs or turn it off in spec.monitoring"
                )
                continue
            failures.append(f"applying {target}: {error.reason}: {_api_message(error)}")
            config_failed = config_failed or obj["kind"] == "ConfigMap"
            continue
        ctx.seen.note(_key(obj), after)
        if caught_up and _repaired(ctx, before, after):
            message = f"{target} was changed or deleted outside the operator; restored it"
            _log.info("%s/%s: %s", involved.namespace, involved.name, message)
            ctx.recorder.record(involved, kind="Warning", reason="Restored", message=message)
    return failures


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


def reconcile(ctx: Context, namespace: str, name: str) -> bool | float | None:
    """Bring one SmtpRelay's objects and status up to date.

    Returns True when settled, False when something failed and should be retried with
    backoff, a number of seconds to look again after (waiting for the relay to take the new
    relay.yaml), None when the SmtpRelay no longer exists.
    """
    relay = ctx.kube.get(api.API_VERSION, api.KIND, namespace=namespace, name=name)
    if relay is None or relay["metadata"].get("deletionTimestamp"):
        return None
    meta = relay["metadata"]
    involved = Involved.of(relay)
    generation = _generation(meta)
    known = relay.get("status") or {}
    caught_up = known.get("observedGeneration") == generation and "configHash" in known
    rendered = render.render(
        name=name,
        namespace=namespace,
        spec=relay.get("spec") or {},
        owner=render.Owner(name=name, uid=meta["uid"]),
        defaults=ctx.defaults,
    )
    applied_hash = str(known.get("configHash") or rendered.config_hash)
    applied_restart = rendered.restart_hash

    problem = _validate(rendered)
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

    failures = _apply_children(ctx, rendered, involved, caught_up=caught_up)
    if not any(f.startswith("applying ConfigMap") for f in failures):
        applied_hash = rendered.config_hash
    if failures:
        failure = status.Failure(reason="ApplyFailed", message="; ".join(failures))
        return _fail(ctx, relay, involved, generation, applied_hash, failure, settled=False)

    if not caught_up or known.get("configHash") != rendered.config_hash:
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
        ctx.kube,
        relay,
        _observer(
            ctx,
            generation=generation,
            config_hash=applied_hash,
            restart_hash=applied_restart,
            failure=None,
        ),
    )
    if meta["uid"] not in ctx.known:
        ctx.known.add(meta["uid"])
        _log.info("%s/%s: reconciled %s (generation %s)", namespace, name, name, generation)
    if written is not None and _waiting_for_relay(written):
        return CONFIG_POLL  # look again soon: nothing else will say when the relay switched
    return True


CONFIG_POLL = 5.0


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
        ctx.kube,
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
