"""SmtpRelays carrying statuses the operator's own `status.compute` writes, for the tests
that check how GitOps tools (kstatus, Argo CD) read them."""

from __future__ import annotations

from typing import Any

from smtprelay_operator import api, status

T0 = "2026-01-01T00:00:00Z"


def deployment(*, restart_hash: str = "r", available: int = 1) -> dict[str, Any]:
    """A Deployment rolled out with pod template ``restart_hash``."""
    return {
        "metadata": {"generation": 1},
        "spec": {
            "replicas": 1,
            "template": {"metadata": {"annotations": {api.RESTART_HASH_ANNOTATION: restart_hash}}},
        },
        "status": {
            "observedGeneration": 1,
            "updatedReplicas": 1,
            "replicas": 1,
            "availableReplicas": available,
            "readyReplicas": available,
        },
    }


def relay(*, generation: int = 2, **facts: Any) -> dict[str, Any]:
    """SmtpRelay mail/mail at ``generation`` whose status the operator computed from
    ``facts`` (by default: generation 2 applied, its config running)."""
    base: dict[str, Any] = {
        "generation": 2,
        "config_hash": "c",
        "restart_hash": "r",
        "deployment": deployment(),
        "running": status.Running(hash="c"),
    }
    observed = status.Observed(**{**base, **facts})
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "mail", "namespace": "mail", "generation": generation},
        "status": status.compute(observed, previous=[], now=T0),
    }
