"""Events about an SmtpRelay, deduplicated the way the Kubernetes event recorder does it.

One Event per (object, type, reason, message): its name is derived from those, so a repeat
(a retry failing the same way, or the same failure after an operator restart) raises the
Event's ``count`` and ``lastTimestamp`` instead of adding one more object. A stuck apply
therefore leaves one Event with a growing count, not one Event per retry.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiException

from smtprelay_operator import api
from smtprelay_operator.kube import CONFLICT, NOT_FOUND, Kube

_log = logging.getLogger(__name__)
_REMEMBERED = 4096  # Events whose count is kept in memory (the recorder's LRU cache)
_MESSAGE_LIMIT = 1024


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Involved:
    """The object an Event is about."""

    namespace: str
    name: str
    uid: str
    api_version: str = api.API_VERSION
    kind: str = api.KIND

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Involved:
        meta = obj["metadata"]
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            api_version=obj.get("apiVersion") or api.API_VERSION,
            kind=obj.get("kind") or api.KIND,
        )


def event_name(involved: Involved, kind: str, reason: str, message: str) -> str:
    """Stable for the same object, type, reason and message; a valid Event name."""
    digest = hashlib.sha256(
        "\0".join((involved.uid, kind, reason, message)).encode("utf-8")
    ).hexdigest()
    return f"{involved.name}.{digest[:16]}"


class Recorder:
    """Posts Events, counting repeats; thread-safe, since reconciles run in threads."""

    def __init__(self, kube: Kube, *, component: str, instance: str) -> None:
        self._kube = kube
        self._component = component
        self._instance = instance
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _remember(self, name: str, count: int) -> None:
        with self._lock:
            self._counts[name] = count
            self._counts.move_to_end(name)
            while len(self._counts) > _REMEMBERED:
                self._counts.popitem(last=False)

    def record(self, involved: Involved, *, kind: str, reason: str, message: str) -> None:
        """Post or count one Event; a failure to post is logged, never raised."""
        message = message[:_MESSAGE_LIMIT]
        name = event_name(involved, kind, reason, message)
        try:
            self._post(involved, name, kind=kind, reason=reason, message=message)
        except ApiException as error:
            _log.warning("could not post Event %s: %s %s", name, error.status, error.reason)

    def _post(self, involved: Involved, name: str, *, kind: str, reason: str, message: str) -> None:
        now = _now()
        with self._lock:
            known = self._counts.get(name)
        if known is not None:
            count = known + 1
            try:
                self._kube.patch_event(
                    involved.namespace, name, {"count": count, "lastTimestamp": now}
                )
            except ApiException as error:
                if error.status != NOT_FOUND:
                    raise
                # Expired (the API server keeps Events an hour): start a new count.
            else:
                self._remember(name, count)
                return
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": involved.namespace},
            "involvedObject": {
                "apiVersion": involved.api_version,
                "kind": involved.kind,
                "name": involved.name,
                "namespace": involved.namespace,
                "uid": involved.uid,
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": self._component},
            "reportingComponent": self._component,
            "reportingInstance": self._instance,
        }
        try:
            self._kube.create_event(involved.namespace, body)
            self._remember(name, 1)
        except ApiException as error:
            if error.status != CONFLICT:
                raise
            # Posted before this process started (an operator restart): carry its count on.
            existing = self._kube.get_event(involved.namespace, name) or {}
            count = int(existing.get("count") or 1) + 1
            self._kube.patch_event(involved.namespace, name, {"count": count, "lastTimestamp": now})
            self._remember(name, count)
