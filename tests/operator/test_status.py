"""status: Ready/Progressing/Degraded from what was applied and what the Deployment says."""

from __future__ import annotations

from typing import Any

from smtprelay_operator import api, status

HASH = "c0ffee"
T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:05:00Z"


def deployment(
    *,
    replicas: int = 1,
    generation: int = 2,
    observed: int = 2,
    updated: int = 1,
    current: int = 1,
    available: int = 1,
    config_hash: str = HASH,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {api.RESTART_HASH_ANNOTATION: config_hash}}},
        },
        "status": {
            "observedGeneration": observed,
            "updatedReplicas": updated,
            "replicas": current,
            "availableReplicas": available,
            "readyReplicas": available,
            "conditions": conditions or [],
        },
    }


def observe(live: dict[str, Any] | None, **overrides: Any) -> status.Observed:
    facts: dict[str, Any] = {
        "generation": 3,
        "config_hash": HASH,
        "restart_hash": HASH,
        "deployment": live,
    }
    facts.update(overrides)
    return status.Observed(**facts)


def by_type(computed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["type"]: item for item in computed["conditions"]}


class TestRollout:
    def test_available_current_deployment_is_ready(self) -> None:
        """Rolled out and available: Ready True, Progressing False, Degraded False."""
        conditions = by_type(status.compute(observe(deployment()), previous=[], now=T0))
        assert conditions["Ready"]["status"] == "True"
        assert conditions["Progressing"]["status"] == "False"
        assert conditions["Degraded"]["status"] == "False"

    def test_old_config_hash_is_still_rolling_out(self) -> None:
        """A pod template with another config hash is not Ready for this spec."""
        live = deployment(config_hash="old")
        conditions = by_type(status.compute(observe(live), previous=[], now=T0))
        assert conditions["Ready"]["status"] == "False"
        assert conditions["Progressing"]["status"] == "True"

    def test_unobserved_deployment_generation_is_still_rolling_out(self) -> None:
        """The Deployment controller has not seen the newest template yet."""
        live = deployment(generation=3, observed=2)
        conditions = by_type(status.compute(observe(live), previous=[], now=T0))
        assert conditions["Ready"]["reason"] == "RollingOut"

    def test_pod_not_ready_yet(self) -> None:
        """Rolled out but not available: waiting for the pod."""
        live = deployment(available=0)
        conditions = by_type(status.compute(observe(live), previous=[], now=T0))
        assert conditions["Ready"]["reason"] == "PodNotReady"
        assert conditions["Progressing"]["reason"] == "WaitingForPod"

    def test_missing_deployment(self) -> None:
        """No Deployment: not Ready, still Progressing."""
        conditions = by_type(status.compute(observe(None), previous=[], now=T0))
        assert conditions["Ready"]["reason"] == "DeploymentMissing"
        assert conditions["Progressing"]["status"] == "True"

    def test_suspended(self) -> None:
        """Suspended and scaled to 0: Ready False with reason Suspended, not Progressing."""
        live = deployment(replicas=0, updated=0, current=0, available=0)
        conditions = by_type(status.compute(observe(live), previous=[], now=T0))
        assert conditions["Ready"]["reason"] == "Suspended"
        assert conditions["Progressing"]["status"] == "False"

    def test_scaling_down(self) -> None:
        """Suspended while the pod still runs: Progressing True, ScalingDown."""
        live = deployment(replicas=0, updated=0, current=1, available=1)
        conditions = by_type(status.compute(observe(live), previous=[], now=T0))
        assert conditions["Ready"]["reason"] == "Suspended"
        assert conditions["Progressing"]["reason"] == "ScalingDown"


class TestDegraded:
    def test_progress_deadline_exceeded_is_degraded(self) -> None:
        """The Deployment's own failure shows as Degraded with its reason."""
        stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        live = deployment(available=0, conditions=[stuck])
        conditions = by_type(status.compute(observe(live), previous=[], now=T0))
        assert conditions["Degraded"]["status"] == "True"
        assert conditions["Degraded"]["reason"] == "ProgressDeadlineExceeded"

    def test_operator_failure_is_degraded_and_not_ready_for_this_generation(self) -> None:
        """A spec that cannot be applied: Degraded and Stalled say why; Ready is False for
        this generation (the older one keeps running, Progressing describes it)."""
        failure = status.Failure(
            reason="InvalidConfig", message="allowedNetworks[0]: bad", stalled=True
        )
        facts = observe(deployment(), failure=failure)
        conditions = by_type(status.compute(facts, previous=[], now=T0))
        assert conditions["Degraded"] == {
            "type": "Degraded",
            "status": "True",
            "observedGeneration": 3,
            "lastTransitionTime": T0,
            "reason": "InvalidConfig",
            "message": "allowedNetworks[0]: bad",
        }
        assert conditions["Ready"]["status"] == "False"
        assert conditions["Ready"]["observedGeneration"] == 3
        assert conditions["Stalled"]["status"] == "True"
        assert conditions["Stalled"]["message"] == "allowedNetworks[0]: bad"
        assert conditions["Reconciling"]["status"] == "False"
        assert conditions["Progressing"]["reason"] == "RolloutComplete"


class TestKstatus:
    """The conditions kstatus reads (Reconciling, Stalled), per sigs.k8s.io/cli-utils."""

    def test_rolling_out_is_reconciling(self) -> None:
        """While the pod rolls, Reconciling is True: kstatus says InProgress."""
        conditions = by_type(
            status.compute(observe(deployment(config_hash="old")), previous=[], now=T0)
        )
        assert conditions["Reconciling"]["status"] == "True"
        assert conditions["Stalled"]["status"] == "False"

    def test_rolled_out_is_neither(self) -> None:
        """Rolled out: Reconciling and Stalled both False, so kstatus says Current."""
        conditions = by_type(status.compute(observe(deployment()), previous=[], now=T0))
        assert conditions["Reconciling"]["status"] == "False"
        assert conditions["Stalled"]["status"] == "False"
        assert conditions["Ready"]["status"] == "True"

    def test_retried_failure_is_reconciling(self) -> None:
        """An apply that failed and is retried: Reconciling True with the reason, not Stalled."""
        failure = status.Failure(reason="ApplyFailed", message="applying ConfigMap: timeout")
        conditions = by_type(
            status.compute(observe(deployment(), failure=failure), previous=[], now=T0)
        )
        assert conditions["Reconciling"]["status"] == "True"
        assert conditions["Reconciling"]["reason"] == "ApplyFailed"
        assert conditions["Stalled"]["status"] == "False"
        assert conditions["Ready"]["status"] == "False"

    def test_deployment_that_gave_up_is_stalled(self) -> None:
        """The Deployment's progress deadline passed: Stalled, no longer Reconciling."""
        stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        live = deployment(available=0, conditions=[stuck])
        conditions = by_type(status.compute(observe(live), previous=[], now=T0))
        assert conditions["Stalled"]["reason"] == "ProgressDeadlineExceeded"
        assert conditions["Reconciling"]["status"] == "False"


class TestRunningConfig:
    """Ready for a generation only once the relay says it runs that relay.yaml."""

    def test_relay_still_on_the_old_config_is_pending(self) -> None:
        """The pod is ready but reports another hash: Ready False, Reconciling True."""
        facts = observe(deployment(), config_hash="new", running=status.Running(hash="old"))
        computed = status.compute(facts, previous=[], now=T0)
        conditions = by_type(computed)
        assert conditions["Ready"]["status"] == "False"
        assert conditions["Ready"]["reason"] == "ConfigPending"
        assert conditions["Reconciling"]["status"] == "True"
        assert computed["runningConfigHash"] == "old"

    def test_relay_on_the_new_config_is_ready(self) -> None:
        """The relay reports the applied hash: Ready True, Reconciling False."""
        facts = observe(deployment(), config_hash="new", running=status.Running(hash="new"))
        conditions = by_type(status.compute(facts, previous=[], now=T0))
        assert conditions["Ready"]["status"] == "True"
        assert conditions["Reconciling"]["status"] == "False"

    def test_relay_that_cannot_be_asked_is_pending_with_the_reason(self) -> None:
        """No answer from /config: not Ready, and the message says why."""
        facts = observe(deployment(), running=status.Running(error="connection refused"))
        conditions = by_type(status.compute(facts, previous=[], now=T0))
        assert conditions["Ready"]["reason"] == "ConfigPending"
        assert "connection refused" in conditions["Ready"]["message"]


class TestShape:
    def test_top_level_fields(self) -> None:
        """observedGeneration, configHash and readyReplicas sit beside the conditions."""
        computed = status.compute(observe(deployment()), previous=[], now=T0)
        assert computed["observedGeneration"] == 3
        assert computed["configHash"] == HASH
        assert computed["readyReplicas"] == 1
        assert [c["type"] for c in computed["conditions"]] == [
            "Ready",
            "Progressing",
            "Degraded",
            "Reconciling",
            "Stalled",
        ]

    def test_transition_time_moves_only_with_status(self) -> None:
        """Recomputing with the same facts later gives the same status, so nothing is written."""
        first = status.compute(observe(deployment()), previous=[], now=T0)
        again = status.compute(observe(deployment()), previous=first["conditions"], now=T1)
        assert again == first

    def test_transition_time_moves_when_status_changes(self) -> None:
        """Ready going False stamps a new lastTransitionTime; unchanged ones keep theirs."""
        first = status.compute(observe(deployment()), previous=[], now=T0)
        later = status.compute(
            observe(deployment(available=0)), previous=first["conditions"], now=T1
        )
        conditions = by_type(later)
        assert conditions["Ready"]["lastTransitionTime"] == T1
        assert conditions["Degraded"]["lastTransitionTime"] == T0
