"""The SmtpRelays as the watch last reported them, so a reconcile need not read its own.

An informer's cache, trimmed: the metadata a reconcile uses, the spec and the status (no
managedFields, annotations or labels), so 1,000 SmtpRelays cost a few MiB. A watch event
is noted before its SmtpRelay is queued, so the worker sees that event's state or a later
one. What is written from it is safe against staleness: the status write names the
resourceVersion it was computed from and is refused (409, then re-read) if it is stale.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from typing import Any

from smtprelay_operator import render

Object = dict[str, Any]
RelayKey = tuple[str, str]  # (namespace, name)
_METADATA = ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp")


def trimmed(body: Mapping[str, Any]) -> Object:
    meta = body.get("metadata") or {}
    result: Object = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {key: meta[key] for key in _METADATA if key in meta},
        "spec": body.get("spec") or {},
    }
    if "status" in body:
        result["status"] = body["status"]
    return result


class RelayCache:
    """Thread-safe: the watch writes from the event loop, workers read from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._relays: dict[RelayKey, Object] = {}

    def note(self, body: Mapping[str, Any], *, deleted: bool = False) -> RelayKey:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        with self._lock:
            if deleted:
                self._relays.pop(key, None)
            else:
                self._relays[key] = trimmed(body)
        return key

    def replaced(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
        """The operator wrote ``before`` and got ``after``: noted only if the cache still
        holds ``before`` (a later watch event is never overwritten with an older write)."""
        meta = before.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        with self._lock:
            held = self._relays.get(key)
            version = (held or {}).get("metadata", {}).get("resourceVersion")
            if held is not None and version == meta.get("resourceVersion"):
                self._relays[key] = trimmed(after)

    def get(self, namespace: str, name: str) -> Object | None:
        """The last reported state, or None when the watch has not reported it (or its
        deletion): then the caller reads it from the API server."""
        with self._lock:
            return self._relays.get((namespace, name))

    def __len__(self) -> int:
        with self._lock:
            return len(self._relays)


class Renders:
    """What the last few hundred SmtpRelays reconciled render to, by uid and generation.

    The spec changes only with the generation (the status is a subresource), and render
    is pure, so a reconcile that a child's status change or a second pass asks for need not
    render again (rendering relay.yaml is most of a no-op reconcile's CPU). Thread-safe.
    """

    def __init__(self, *, size: int = 512) -> None:
        self._lock = threading.Lock()
        self._size = size
        self._renders: collections.OrderedDict[tuple[str, int], render.Rendered] = (
            collections.OrderedDict()
        )

    def of(self, relay: Mapping[str, Any], defaults: render.OperatorDefaults) -> render.Rendered:
        """``relay`` rendered with ``defaults`` (the same for every call of one cache)."""
        meta = relay["metadata"]
        key = (str(meta["uid"]), int(meta.get("generation") or 0))
        with self._lock:
            rendered = self._renders.get(key)
            if rendered is not None:
                self._renders.move_to_end(key)
                return rendered
        rendered = render.render(
            name=meta["name"],
            namespace=meta["namespace"],
            spec=relay.get("spec") or {},
            owner=render.Owner(name=meta["name"], uid=meta["uid"]),
            defaults=defaults,
        )
        if key[1]:  # no generation, no telling a spec change: not kept
            with self._lock:
                self._renders[key] = rendered
                while len(self._renders) > self._size:
                    self._renders.popitem(last=False)
        return rendered
