"""Children an SmtpRelay no longer asks for: removed when its spec stops asking.

Only the optional ones can go away while the SmtpRelay lives: the PodMonitor and the
PrometheusRule of ``spec.monitoring``. (Everything else goes with the SmtpRelay itself,
through its owner references.) They are looked for only when a spec change is applied
and the SmtpRelay had been applied before, so a burst of new SmtpRelays costs the API
server nothing here. An object of that name is deleted only if this SmtpRelay owns it
(its uid in the object's owner references, and as a delete precondition): a user's own
PodMonitor that happens to share the name is left alone. A cluster without
prometheus-operator's CRDs answers 404, which means there is nothing to remove.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.client import ApiException

from smtprelay_operator import monitoring
from smtprelay_operator.kube import Kube

_log = logging.getLogger(__name__)

OPTIONAL = ("PodMonitor", "PrometheusRule")


def unwanted(rendered: Iterable[Mapping[str, Any]]) -> list[str]:
    """The optional kinds the rendered children no longer include. Pure."""
    kept = {obj["kind"] for obj in rendered}
    return [kind for kind in OPTIONAL if kind not in kept]


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether ``uid`` is among the object's owners. Pure."""
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(o, Mapping) and o.get("uid") == uid for o in owners)


def remove_unwanted(
    kube: Kube, relay: Mapping[str, Any], rendered: Iterable[Mapping[str, Any]]
) -> list[str]:
    """Delete this SmtpRelay's optional children it no longer asks for; returns the kinds
    deleted. A failure is logged, not raised: it is retried at the next spec change."""
    meta = relay["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    deleted = []
    for kind in unwanted(rendered):
        try:
            found = kube.get(monitoring.API_VERSION, kind, namespace=namespace, name=name)
            own_uid = (found.get("metadata") or {}).get("uid") if found is not None else None
            if found is None or not own_uid or not owned_by(found, uid):
                continue  # not there, not whole, or not ours: nothing of ours to remove
            if kube.delete(
                monitoring.API_VERSION, kind, namespace=namespace, name=name, uid=str(own_uid)
            ):
                deleted.append(kind)
                _log.info("%s/%s: deleted %s %s (spec.monitoring)", namespace, name, kind, name)
        except ApiException as error:
            _log.warning(
                "%s/%s: could not remove %s %s: %s %s",
                namespace,
                name,
                kind,
                name,
                error.status,
                error.reason,
            )
    return deleted
