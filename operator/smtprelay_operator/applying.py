"""Applying one SmtpRelay's rendered children: stage after stage, side by side within one.

`render.Rendered` says the stages: what the relay pod mounts (its ConfigMap and its spool
claim), then its Deployment, then the rest. The objects of one stage do not wait for each
other, so with a ``side`` executor they are applied at the same time (the first in the
calling thread); a stage starts when the one before it is done. The Deployment is applied
only if the ConfigMap went through: a pod must never roll onto a hash whose relay.yaml is
not in place. (On an SmtpRelay's first apply there is no pod to roll and the three go in
one stage: a new pod waits for its ConfigMap to mount.) A child the operator applied just
so and nobody has touched since is left alone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kubernetes.client import ApiException

from smtprelay_operator import metrics
from smtprelay_operator.children import Children, key_of
from smtprelay_operator.events import Involved, Recorder
from smtprelay_operator.kube import NOT_FOUND, Kube

_log = logging.getLogger(__name__)

Object = dict[str, Any]


class Parts(Protocol):
    """What applying needs of the reconcile's context."""

    @property
    def kube(self) -> Kube: ...
    @property
    def children(self) -> Children: ...
    @property
    def recorder(self) -> Recorder: ...
    @property
    def reapply_after(self) -> float: ...
    @property
    def side(self) -> concurrent.futures.Executor | None: ...


@dataclasses.dataclass
class Applying:
    """What applying some of one SmtpRelay's children came to."""

    failures: list[str] = dataclasses.field(default_factory=list)
    deployment: Object | None = None
    """The Deployment as its apply returned it (None if not applied)."""
    sent: int = 0
    """Applies sent (the others were untouched since the operator's last apply)."""
    config_failed: bool = False


def api_message(error: ApiException) -> str:
    """The API server's own message (it names the field), not the whole response body."""
    try:
        return str(json.loads(error.body or "{}").get("message") or error.body)
    except ValueError:
        return str(error.body)


def _target(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata']['name']}"


def _apply_one(
    ctx: Parts, obj: Object, involved: Involved, *, caught_up: bool
) -> tuple[Object | None, str | None]:
    """(what the apply returned, or None; why it failed, or None)."""
    before = ctx.children.before_apply(key_of(obj))
    try:
        after = ctx.kube.apply(obj)
    except ApiException as error:
        if error.status == NOT_FOUND and obj["apiVersion"].startswith("monitoring.coreos"):
            return None, (
                f"applying {_target(obj)}: the cluster has no {obj['kind']} kind; install "
                "prometheus-operator's CRDs or turn it off in spec.monitoring"
            )
        return None, f"applying {_target(obj)}: {error.reason}: {api_message(error)}"
    known, state = before
    put_back = ctx.children.applied(obj, after, seen=state)
    if caught_up and (put_back or (known and state is None)):  # changed, or deleted
        message = f"{_target(obj)} was changed or deleted outside the operator; restored it"
        _log.info("%s/%s: %s", involved.namespace, involved.name, message)
        ctx.recorder.record(involved, kind="Warning", reason="Restored", message=message)
    return after, None


def _apply_stage(
    ctx: Parts, objects: list[Object], involved: Involved, *, caught_up: bool
) -> list[tuple[Object | None, str | None]]:
    """Apply ``objects`` side by side (in order without a side executor)."""
    if ctx.side is None or len(objects) < 2:
        return [_apply_one(ctx, obj, involved, caught_up=caught_up) for obj in objects]
    others = [
        ctx.side.submit(_apply_one, ctx, obj, involved, caught_up=caught_up) for obj in objects[1:]
    ]
    try:
        first = _apply_one(ctx, objects[0], involved, caught_up=caught_up)
    finally:  # never leave an apply of this SmtpRelay behind when the reconcile ends
        concurrent.futures.wait(others)
    return [first, *(future.result() for future in others)]


def apply_stages(
    ctx: Parts,
    stages: Sequence[Sequence[Object]],
    involved: Involved,
    *,
    caught_up: bool,
    into: Applying,
) -> Applying:
    """Apply ``stages`` one after the other, each one's objects side by side."""
    for stage in stages:
        todo: list[Object] = []
        for obj in stage:
            if obj["kind"] == "Deployment" and into.config_failed:
                into.failures.append(f"{_target(obj)} not applied: its ConfigMap was not")
            elif ctx.children.untouched(obj, max_age=ctx.reapply_after):
                metrics.APPLIES.labels(outcome="unchanged").inc()
            else:
                metrics.APPLIES.labels(outcome="applied").inc()
                todo.append(obj)
        into.sent += len(todo)
        for obj, (after, failure) in zip(
            todo, _apply_stage(ctx, todo, involved, caught_up=caught_up), strict=True
        ):
            if failure is not None:
                into.failures.append(failure)
                into.config_failed = into.config_failed or obj["kind"] == "ConfigMap"
            elif obj["kind"] == "Deployment":
                into.deployment = after
    return into
