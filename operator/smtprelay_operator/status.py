"""An SmtpRelay's status from what the operator applied and what its Deployment reports.

Pure, like `render`: the reconciler fetches, this decides. Conditions follow the
metav1.Condition shape, and a condition's lastTransitionTime moves only when its status
does, so computing the status twice from the same facts gives the same dict and the write
can be skipped.

The conditions follow kstatus (sigs.k8s.io/cli-utils/pkg/kstatus, read by Flux, Helm 4's
``--wait`` and Argo CD's health checks): ``observedGeneration`` is written once the outcome
of that generation is known (applied, or refused); ``Reconciling`` is True while the relay
is not yet running it (pod rolling, config not yet picked up, an apply being retried);
``Stalled`` is True when the spec can never be applied as it is. ``Ready`` is True only
when the relay runs this generation; ``Progressing``/``Degraded`` are kept for
``kubectl wait`` users and say the same in the Deployment's own words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from smtprelay_operator import api

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
RECONCILING = "Reconciling"
STALLED = "Stalled"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED, RECONCILING, STALLED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failure:
    """Why the operator could not apply the spec; ``stalled`` when retrying cannot help."""

    reason: str
    message: str
    stalled: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Running:
    """What the relay said about the relay.yaml it runs (its /config), or why it could not."""

    hash: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observed:
    """The facts one status is computed from."""

    generation: int
    """The SmtpRelay generation the objects were last applied from."""
    config_hash: str
    """The hash of the relay.yaml last applied (kept when a newer spec could not be)."""
    deployment: Mapping[str, Any] | None
    """The live Deployment, or None when it does not exist."""
    restart_hash: str | None = None
    """The restart hash of the pod template applied; None: whatever the Deployment has
    (nothing new was applied)."""
    running: Running | None = None
    """What the relay runs; None when the operator does not ask (then Ready follows the
    Deployment alone)."""
    failure: Failure | None = None
    """Why the operator could not apply this generation, if it could not."""


@dataclasses.dataclass(frozen=True)
class _Verdict:
    status: str
    reason: str
    message: str


def _deployment_failure(deployment: Mapping[str, Any]) -> _Verdict | None:
    for condition in deployment.get("status", {}).get("conditions") or []:
        kind, status = condition.get("type"), condition.get("status")
        if (kind == "Progressing" and status == "False") or (
            kind == "ReplicaFailure" and status == "True"
        ):
            reason = condition.get("reason") or kind
            return _Verdict("True", reason, condition.get("message") or reason)
    return None


def _rollout(observed: Observed) -> tuple[_Verdict, _Verdict]:
    """(Ready, Progressing) from the Deployment's own account of its rollout."""
    deployment = observed.deployment
    if deployment is None:
        waiting = _Verdict("False", "DeploymentMissing", "the relay Deployment does not exist")
        return waiting, _Verdict("True", "Creating", "creating the relay Deployment")
    spec = deployment.get("spec", {})
    state = deployment.get("status", {})
    desired = int(spec.get("replicas", 1))
    template = spec.get("template", {}).get("metadata", {}).get("annotations") or {}
    current = (
        int(state.get("observedGeneration", 0)) >= int(deployment["metadata"].get("generation", 0))
        and observed.restart_hash in (None, template.get(api.RESTART_HASH_ANNOTATION))
        and int(state.get("updatedReplicas", 0)) == desired
        and int(state.get("replicas", 0)) == desired
    )
    available = int(state.get("availableReplicas", 0))
    if desired == 0:  # only spec.suspended scales the relay to 0
        ready = _Verdict("False", "Suspended", "spec.suspended is true; the queue is kept")
        if current:
            return ready, _Verdict("False", "Suspended", "scaled to 0")
        return ready, _Verdict("True", "ScalingDown", "stopping the relay pod")
    if not current:
        return (
            _Verdict("False", "RollingOut", "the relay pod is being replaced"),
            _Verdict("True", "RollingOut", "rolling out the current configuration"),
        )
    if available < desired:
        return (
            _Verdict("False", "PodNotReady", "the relay pod is not ready yet"),
            _Verdict("True", "WaitingForPod", "waiting for the relay pod to become ready"),
        )
    running = observed.running
    if running is not None and running.hash != observed.config_hash:
        said = (
            f"cannot ask the relay which config it runs: {running.error}"
            if running.error
            else f"the relay runs config {str(running.hash)[:12]}"
        )
        message = (
            f"{said}; waiting for it to take {observed.config_hash[:12]} (the kubelet "
            "updates the mounted ConfigMap within about a minute)"
        )
        return (
            _Verdict("False", "ConfigPending", message),
            _Verdict("True", "ConfigPending", message),
        )
    return (
        _Verdict("True", "Available", "the relay is accepting mail with this configuration"),
        _Verdict("False", "RolloutComplete", "the current configuration is running"),
    )


def _degraded(observed: Observed) -> _Verdict:
    if observed.failure is not None:
        return _Verdict("True", observed.failure.reason, observed.failure.message)
    if observed.deployment is not None:
        failure = _deployment_failure(observed.deployment)
        if failure is not None:
            return failure
    return _Verdict("False", "AsExpected", "no failures reported")


def _kstatus(
    observed: Observed, ready: _Verdict, progressing: _Verdict, degraded: _Verdict
) -> tuple[_Verdict, _Verdict, _Verdict]:
    """(Ready, Reconciling, Stalled) for this generation."""
    failure = observed.failure
    if failure is not None:
        not_running = _Verdict(
            "False", failure.reason, f"generation {observed.generation} is not running"
        )
        if failure.stalled:
            return (
                not_running,
                _Verdict("False", failure.reason, "retrying cannot help; fix the spec"),
                _Verdict("True", failure.reason, failure.message),
            )
        return (
            not_running,
            _Verdict("True", failure.reason, f"retrying: {failure.message}"),
            _Verdict("False", "Retrying", "the apply is retried with backoff"),
        )
    if degraded.status == "True":  # the Deployment gave up (progress deadline exceeded)
        return (
            ready,
            _Verdict("False", degraded.reason, "the Deployment stopped progressing"),
            degraded,
        )
    reconciling = _Verdict(progressing.status, progressing.reason, progressing.message)
    return ready, reconciling, _Verdict("False", "AsExpected", "nothing is stuck")


def _condition(
    kind: str,
    verdict: _Verdict,
    *,
    generation: int,
    previous: Mapping[str, Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    before = previous.get(kind)
    unchanged = before is not None and before.get("status") == verdict.status
    transition = before.get("lastTransitionTime") if before is not None and unchanged else now
    return {
        "type": kind,
        "status": verdict.status,
        "observedGeneration": generation,
        "lastTransitionTime": transition or now,
        "reason": verdict.reason,
        "message": verdict.message,
    }


def compute(
    observed: Observed, *, previous: Sequence[Mapping[str, Any]], now: str
) -> dict[str, Any]:
    """The whole ``status`` of an SmtpRelay; ``now`` stamps conditions whose status changed."""
    by_type = {condition.get("type", ""): condition for condition in previous}
    # A failure to apply leaves the last applied objects running: Progressing keeps
    # describing them; Ready is False for this generation, Degraded and Stalled or
    # Reconciling say why.
    ready, progressing = _rollout(observed)
    degraded = _degraded(observed)
    ready, reconciling, stalled = _kstatus(observed, ready, progressing, degraded)
    verdicts = {
        READY: ready,
        PROGRESSING: progressing,
        DEGRADED: degraded,
        RECONCILING: reconciling,
        STALLED: stalled,
    }
    deployment_status = (observed.deployment or {}).get("status", {})
    result: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "configHash": observed.config_hash,
        "readyReplicas": int(deployment_status.get("readyReplicas", 0)),
        "conditions": [
            _condition(
                kind, verdicts[kind], generation=observed.generation, previous=by_type, now=now
            )
            for kind in CONDITION_TYPES
        ],
    }
    if observed.running is not None and observed.running.hash:
        result["runningConfigHash"] = observed.running.hash
    return result
