"""kopf handlers: apply what `render` makes, put back what others change, report status.

Level-triggered and idempotent: every handler renders the whole desired state from the
SmtpRelay as it is now and server-side-applies it, so a restart, a repeated event or two
handlers racing all converge on the same objects and an unchanged spec changes nothing.
Deletion needs no handler and no finalizer: the children carry ownerReferences and the
garbage collector removes them (all but a retained spool PVC).
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf
import yaml
from kubernetes.client import ApiException
from smtprelay.config import ConfigError, parse_config

from smtprelay_operator import api, render, status
from smtprelay_operator.kube import CONFLICT, Kube, load_api_client

_STATUS_WRITE_ATTEMPTS = 5
_APPLY_RETRY_DELAY = 10.0
_CHILD_FILTER = {api.MANAGED_BY_LABEL: api.MANAGED_BY, api.NAME_LABEL: "smtprelay"}
_CHILD_RESOURCES = (
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("", "v1", "persistentvolumeclaims"),
    ("apps", "v1", "deployments"),
)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _report_failure(
    kube: Kube, body: Any, generation: int, config_hash: str, reason: str, message: str
) -> None:
    """A Warning Event for the owner, and Degraded with ``reason`` in the status."""
    kopf.event(body, type="Warning", reason=reason, message=message)
    _write_status(
        kube,
        body,
        lambda current: _observe(
            kube,
            current,
            generation=generation,
            config_hash=config_hash,
            failure=(reason, message),
        ),
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's footprint on SmtpRelays to one annotation, and Events to what users need."""
    # Progress in annotations only: the status schema has no room for kopf's own stanza.
    # kopf's default prefix, because any other one brings a second "kopf-managed" marker;
    # the diffbase (last-handled-configuration) stays the default annotation.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    # Handler bookkeeping ("Handler succeeded") stays in the operator's log; the Events
    # posted are the ones below, written for the people who own the SmtpRelay.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = api.FIELD_MANAGER
    settings.posting.reporting_instance = socket.gethostname()
    # Filter children on the server: watching every ConfigMap in the cluster to pick out
    # ours would make idle cost grow with everything else in the cluster.
    selector = ",".join(f"{key}={value}" for key, value in sorted(_CHILD_FILTER.items()))
    for resource in _CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = selector
    # Given namespaces, kopf needs no cluster-wide scans of CRDs and namespaces, which a
    # namespaced install (Roles only) may not do: without this it retries them for a minute.
    if getattr(memo, "namespaced", False):
        settings.scanning.disabled = True
    if getattr(memo, "kube", None) is None:
        memo.kube = Kube(load_api_client())


def _owner(meta: Mapping[str, Any]) -> render.Owner:
    return render.Owner(name=meta["name"], uid=meta["uid"])


def _render(relay: Mapping[str, Any], memo: kopf.Memo) -> render.Rendered:
    meta = relay["metadata"]
    return render.render(
        name=meta["name"],
        namespace=meta["namespace"],
        spec=relay.get("spec") or {},
        owner=_owner(meta),
        defaults=memo.defaults,
    )


Observe = Callable[[Mapping[str, Any]], "status.Observed | None"]


def _write_status(kube: Kube, relay: Mapping[str, Any], observe: Observe) -> None:
    """Compute the status from a fresh read and write it unless it is already so.

    ``observe(relay)`` returns the `status.Observed` facts, or None to leave the status alone.
    The write is conditional on the resourceVersion read, so two writers cannot interleave
    a stale status over a newer one; on conflict the read and computation are repeated.
    """
    meta = relay["metadata"]
    for _ in range(_STATUS_WRITE_ATTEMPTS):
        current = kube.get(
            api.API_VERSION, api.KIND, namespace=meta["namespace"], name=meta["name"]
        )
        if current is None or current["metadata"].get("uid") != meta.get("uid"):
            return
        observed = observe(current)
        if observed is None:
            return
        previous = current.get("status") or {}
        new = status.compute(observed, previous=previous.get("conditions") or [], now=_now())
        if all(previous.get(key) == value for key, value in new.items()):
            return
        try:
            kube.replace_status(current, new)
        except ApiException as error:
            if error.status != CONFLICT:
                raise
            continue
        return


def _validate(rendered: render.Rendered) -> str | None:
    """The relay's own verdict on the rendered relay.yaml; None when it would start."""
    try:
        parse_config(yaml.safe_load(rendered.relay_yaml))
    except ConfigError as error:
        return "; ".join(error.problems)
    return None


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
def reconcile(
    body: kopf.Body,
    memo: kopf.Memo,
    reason: str,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Apply the four objects for the SmtpRelay's current spec and report the outcome."""
    kube: Kube = memo.kube
    relay = dict(body)  # the raw dicts under kopf's views
    spec = relay.get("spec") or {}
    generation = int(relay["metadata"].get("generation", 0))
    rendered = _render(relay, memo)
    applied_hash = (relay.get("status") or {}).get("configHash") or rendered.config_hash

    problem = _validate(rendered)
    if problem is not None:
        _report_failure(kube, body, generation, applied_hash, "InvalidConfig", problem)
        raise kopf.PermanentError(f"the relay would refuse this spec: {problem}")

    # Each object on its own: a PVC the cluster refuses to resize must not hold back a
    # new relay.yaml.
    failures: list[str] = []
    for obj in rendered.objects():
        try:
            kube.apply(obj)
        except ApiException as error:
            target = f"{obj['kind']} {obj['metadata']['name']}"
            failures.append(f"applying {target}: {error.reason}: {_api_message(error)}")
            continue
        if obj["kind"] == "Deployment":
            applied_hash = rendered.config_hash
    if failures:
        message = "; ".join(failures)
        _report_failure(kube, body, generation, applied_hash, "ApplyFailed", message)
        raise kopf.TemporaryError(message, delay=_APPLY_RETRY_DELAY)

    if reason != kopf.Reason.RESUME:
        kopf.event(
            body,
            type="Normal",
            reason="Applied",
            message=f"generation {generation}: config {rendered.config_hash[:12]}, "
            f"{render.desired_replicas(spec)} replica(s)",
        )
    logger.info("applied generation %s (config %s)", generation, rendered.config_hash[:12])
    # The Deployment is read again after the SmtpRelay, not taken from the apply: a rollout
    # that finished meanwhile must not be overwritten by the older picture.
    _write_status(
        kube,
        body,
        lambda current: _observe(kube, current, generation=generation, config_hash=applied_hash),
    )


def _api_message(error: ApiException) -> str:
    """The API server's own message (it names the field), not the whole response body."""
    try:
        return str(json.loads(error.body or "{}").get("message") or error.body)
    except ValueError:
        return str(error.body)


def _observe(
    kube: Kube,
    current: Mapping[str, Any],
    *,
    generation: int,
    config_hash: str,
    failure: tuple[str, str] | None = None,
) -> status.Observed:
    """The facts for a status: what reconcile applied, and the Deployment as it is now."""
    meta = current["metadata"]
    deployment = kube.get("apps/v1", "Deployment", namespace=meta["namespace"], name=meta["name"])
    return status.Observed(
        generation=generation,
        config_hash=config_hash,
        deployment=deployment,
        failure=failure,
    )


def _kind_of(body: Mapping[str, Any]) -> str:
    return str(body.get("kind") or "")


@kopf.on.event(*_CHILD_RESOURCES[0], labels=_CHILD_FILTER)
@kopf.on.event(*_CHILD_RESOURCES[1], labels=_CHILD_FILTER)
@kopf.on.event(*_CHILD_RESOURCES[2], labels=_CHILD_FILTER)
@kopf.on.event(*_CHILD_RESOURCES[3], labels=_CHILD_FILTER)
def child_changed(
    event: kopf.RawEvent,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Put back an owned object someone changed or deleted; follow the Deployment's rollout."""
    kube: Kube = memo.kube
    child_meta = body.get("metadata") or {}
    namespace = child_meta.get("namespace")
    relay_name = (child_meta.get("labels") or {}).get(api.INSTANCE_LABEL)
    if not namespace or not relay_name:
        return
    relay = kube.get(api.API_VERSION, api.KIND, namespace=namespace, name=relay_name)
    if relay is None or relay["metadata"].get("deletionTimestamp"):
        return  # being garbage-collected with its SmtpRelay: nothing to put back
    if _owned_by_other(child_meta, relay["metadata"]["uid"]):
        return  # left over from an earlier SmtpRelay of the same name, on its way out
    kind = _kind_of(body)
    rendered = _render(relay, memo)
    if _validate(rendered) is not None:
        # Nothing to apply (reconcile reports the spec), but the running relay's
        # readiness is still worth following.
        if kind == "Deployment" and event.get("type") != "DELETED":
            _follow_rollout(kube, relay, body)
        return
    desired = next(obj for obj in rendered.objects() if obj["kind"] == kind)
    if desired["metadata"]["name"] != child_meta.get("name"):
        return
    result = kube.apply(desired)
    logger.debug("re-applied %s %s", kind, child_meta.get("name"))
    if _restored(event, child_meta, result, relay):
        what = "deleted" if event.get("type") == "DELETED" else "changed"
        message = f"{kind} {child_meta['name']} was {what} outside the operator; restored it"
        logger.info(message)
        kopf.event(
            kopf.Body(cast("kopf.RawBody", relay)),
            type="Warning",
            reason="Restored",
            message=message,
        )
    if kind == "Deployment":
        _follow_rollout(kube, relay, result)


def _restored(
    event: kopf.RawEvent,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    relay: Mapping[str, Any],
) -> bool:
    """Whether applying put back something changed outside the operator (worth an Event).

    Only claimed once reconcile has caught up with the SmtpRelay's spec: until then, a
    difference may simply be the new spec arriving by this path first.
    """
    if event.get("type") == "DELETED":
        return True
    caught_up = (relay.get("status") or {}).get("observedGeneration") == relay["metadata"].get(
        "generation"
    )
    if event.get("type") != "MODIFIED" or not caught_up:
        return False
    meta = after["metadata"]
    if before.get("generation") is not None:  # Deployments: status updates do not count
        return bool(meta.get("generation") != before.get("generation"))
    return bool(meta.get("resourceVersion") != before.get("resourceVersion"))


def _owned_by_other(child_meta: Mapping[str, Any], uid: str) -> bool:
    owners = child_meta.get("ownerReferences") or []
    return any(owner.get("kind") == api.KIND and owner.get("uid") != uid for owner in owners)


def _follow_rollout(kube: Kube, relay: Mapping[str, Any], deployment: Mapping[str, Any]) -> None:
    """Refresh Ready/Progressing/Degraded from the Deployment, keeping what reconcile applied."""

    def observe(current: Mapping[str, Any]) -> status.Observed | None:
        known = current.get("status") or {}
        if "observedGeneration" not in known or "configHash" not in known:
            return None  # reconcile has not reported yet; it will
        failure = next(
            (
                (condition["reason"], condition["message"])
                for condition in known.get("conditions") or []
                if condition.get("type") == status.DEGRADED
                and condition.get("status") == "True"
                and condition.get("reason") in ("InvalidConfig", "ApplyFailed")
            ),
            None,
        )
        return status.Observed(
            generation=int(known["observedGeneration"]),
            config_hash=str(known["configHash"]),
            deployment=deployment,
            failure=failure,
        )

    _write_status(kube, relay, observe)
