"""An SmtpRelay's status from what the operator applied and what its Deployment reports.

Pure, like `render`: the handlers fetch, this decides. Conditions follow the metav1.Condition
shape, and a condition's lastTransitionTime moves only when its status does, so computing
the status twice from the same facts gives the same dict and the write can be skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from smtprelay_operator import api

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observed:
    """The facts one status is computed from."""

    generation: int
    """The SmtpRelay generation the objects were last applied from."""
    config_hash: str
    """The hash of the relay.yaml last applied (kept when a newer spec could not be)."""
    deployment: Mapping[str, Any] | None
    """The live Deployment, or None when it does not exist."""
    failure: tuple[str, str] | None = None
    """(reason, message) when the operator could not apply the spec."""


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
        and template.get(api.CONFIG_HASH_ANNOTATION) == observed.config_hash
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
    return (
        _Verdict("True", "Available", "the relay is accepting mail"),
        _Verdict("False", "RolloutComplete", "the current configuration is running"),
    )


def _degraded(observed: Observed) -> _Verdict:
    if observed.failure is not None:
        reason, message = observed.failure
        return _Verdict("True", reason, message)
    if observed.deployment is not None:
        failure = _deployment_failure(observed.deployment)
        if failure is not None:
            return failure
    return _Verdict("False", "AsExpected", "no failures reported")


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
    # A failure to apply leaves the last applied objects running: Ready and Progressing
    # keep describing them, and Degraded says why the newer spec is not in effect.
    ready, progressing = _rollout(observed)
    verdicts = {READY: ready, PROGRESSING: progressing, DEGRADED: _degraded(observed)}
    deployment_status = (observed.deployment or {}).get("status", {})
    return {
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
