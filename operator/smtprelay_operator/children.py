"""What the operator knows of the objects it owns, without reading them back.

Two sources, kept apart on purpose:

- the watch (kopf, label-filtered on the server) reports every change to a child, in the
  order the API server made them;
- each apply's response says what that apply left (its resourceVersion and generation),
  together with a digest of what was applied.

A child the watch last reported exactly as the operator's own apply left it, and whose
rendered content has not changed since, needs no apply: nobody touched it. So a reconcile
that a Deployment's status change triggered applies nothing, and the status is computed
from the Deployment the watch last reported instead of a fresh read. A PVC or Service that
a controller wrote (a PVC's binding, a load balancer's address) counts as untouched when the
watch reports it still holding every field the operator applied, as the operator applied it:
an apply would change nothing, so the watch event is no news and queues nothing.
An apply record older than ``max_age`` (the resync) does not count, so the resync applies
everything again, repairing whatever a missed watch event hid.

The watch's order is what makes this safe: an apply response is never taken as the newest
state (a watch event of a later change may have been handled before the response was), and
resourceVersions are only compared for equality, never for order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from smtprelay_operator import api

ChildKey = tuple[str, str, str]  # (kind, namespace, name)
Object = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class State:
    """A child as of one write: its resourceVersion and metadata.generation."""

    resource_version: str
    generation: int

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> State:
        meta = body.get("metadata") or {}
        return cls(str(meta.get("resourceVersion")), int(meta.get("generation") or 0))


@dataclasses.dataclass(frozen=True, slots=True)
class _Applied:
    digest: str
    state: State
    at: float
    stamp: tuple[str, str]
    obj: Mapping[str, Any] | None = None
    """What was applied, kept for the kinds controllers write (`_CONTROLLER_WRITTEN`)."""


_CONTROLLER_WRITTEN = frozenset({"PersistentVolumeClaim", "Service"})
"""Kinds whose watched changes are checked for the operator's fields: the PV controller binds
a PVC (two writes), a cloud controller writes a LoadBalancer Service's status. Not the
Deployment (its generation says whether its spec changed) nor the ConfigMap (no controller
writes it; most of its size is relay.yaml, not worth keeping twice)."""


def holds(body: Any, obj: Any) -> bool:
    """Whether ``body`` has every field of ``obj`` with the same value: a map may have more
    keys, a list must have as many items, each holding the applied one's fields."""
    if isinstance(obj, Mapping):
        return isinstance(body, Mapping) and all(
            key in body and holds(body[key], value) for key, value in obj.items()
        )
    if isinstance(obj, list):
        return (
            isinstance(body, list)
            and len(body) == len(obj)
            and all(holds(item, want) for item, want in zip(body, obj, strict=True))
        )
    return bool(body == obj)


def _stamp(body: Mapping[str, Any]) -> tuple[str, str]:
    """(uid, when the operator's fields last changed): the API server moves the time of the
    operator's managedFields entry only when an apply of its changes something."""
    meta = body.get("metadata") or {}
    for entry in meta.get("managedFields") or []:
        if entry.get("manager") == api.FIELD_MANAGER and entry.get("operation") == "Apply":
            return str(meta.get("uid")), str(entry.get("time"))
    return str(meta.get("uid")), ""


def _undone_within_a_second(kind: str, previous: State, seen: State | None, after: State) -> bool:
    """An edit and its repair in the same second as the operator's previous apply leave the
    managedFields time as it was (it has one-second resolution), so the stamp cannot tell.
    Then it is a repair when the watch reported the child changed since the previous apply
    (``seen``) and this apply changed it again, away from both. A Deployment's status is
    written all the time by its controller, so only its generation (its spec) counts; a
    PVC's binding is a controller's write too, so for a PVC the stamp alone decides."""
    if seen is None or kind == "PersistentVolumeClaim":
        return False

    def version(state: State) -> str:
        return str(state.generation) if kind == "Deployment" else state.resource_version

    before, between, now = version(previous), version(seen), version(after)
    return between != before and now not in (before, between)


def digest(obj: Mapping[str, Any]) -> str:
    """Of the rendered object: equal digests, byte-identical applies."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def key_of(obj: Mapping[str, Any]) -> ChildKey:
    meta = obj["metadata"]
    return (str(obj["kind"]), str(meta["namespace"]), str(meta["name"]))


def deployment_view(body: Mapping[str, Any]) -> Object:
    """The part of a Deployment the status is computed from (not its pod template)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    template = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    annotations = {
        key: value for key, value in template.items() if key == api.RESTART_HASH_ANNOTATION
    }
    view: Object = {
        "metadata": {"generation": int(meta.get("generation") or 0)},
        "spec": {"template": {"metadata": {"annotations": annotations}}},
        "status": dict(body.get("status") or {}),
    }
    if "replicas" in spec:
        view["spec"]["replicas"] = spec["replicas"]
    return view


class Children:
    """Thread-safe: the watch notes from the event loop, reconciles from worker threads."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._watched: dict[ChildKey, State | None] = {}
        self._applied: dict[ChildKey, _Applied] = {}
        self._deployments: dict[ChildKey, Object] = {}

    def watched(self, key: ChildKey, body: Mapping[str, Any] | None) -> bool:
        """Note what the watch reported (None: deleted). True when it is news: neither the
        echo of the operator's own apply nor a repeat of what the watch said before."""
        state = None if body is None else State.of(body)
        with self._lock:
            applied = self._applied.get(key)
            if (
                state is not None
                and applied is not None
                and applied.obj is not None
                and state != applied.state
                and holds(body, applied.obj)
            ):  # a controller's write that left the operator's fields as applied
                applied = dataclasses.replace(applied, state=state)
                self._applied[key] = applied
            if body is None:
                self._deployments.pop(key, None)
                self._applied.pop(key, None)
            elif key[0] == "Deployment":
                self._deployments[key] = deployment_view(body)
            repeat = key in self._watched and self._watched[key] == state
            self._watched[key] = state
        echo = applied is not None and state == applied.state
        return not (repeat or echo)

    def before_apply(self, key: ChildKey) -> tuple[bool, State | None]:
        """(known, state): the child as last reported, for telling a repair from a no-op;
        known is False when neither the watch nor an apply ever mentioned it."""
        with self._lock:
            if key in self._watched:
                return True, self._watched[key]
            applied = self._applied.get(key)
        return (True, applied.state) if applied is not None else (False, None)

    def applied(
        self, obj: Mapping[str, Any], response: Mapping[str, Any], *, seen: State | None = None
    ) -> bool:
        """Note an apply of ``obj`` that left ``response``; ``seen``: the child as the watch
        last reported it before the apply. True when the apply put back what someone else
        had changed: the same content as the operator's previous apply, yet the API server
        says the apply changed the operator's fields (or made a new object).
        A resourceVersion comparison alone cannot tell: a controller's write (a PVC's
        binding) may land between the watch's report and the apply."""
        key = key_of(obj)
        kept = obj if key[0] in _CONTROLLER_WRITTEN else None
        record = _Applied(digest(obj), State.of(response), self._clock(), _stamp(response), kept)
        with self._lock:
            previous = self._applied.get(key)
            self._applied[key] = record
        if previous is None or previous.digest != record.digest:
            return False
        if previous.stamp != record.stamp:
            return True
        return _undone_within_a_second(key[0], previous.state, seen, record.state)

    def untouched(self, obj: Mapping[str, Any], *, max_age: float) -> bool:
        """Whether applying ``obj`` now would change nothing: the operator applied exactly
        this less than ``max_age`` seconds ago and the watch has since reported no change to
        it (to a Deployment: none to its spec, since its status is not the operator's)."""
        key = key_of(obj)
        with self._lock:
            record = self._applied.get(key)
            if record is None or key not in self._watched:
                return False
            watched = self._watched[key]
        if watched is None or self._clock() - record.at >= max_age:
            return False
        if key[0] == "Deployment":
            same = watched.generation == record.state.generation
        else:
            same = watched == record.state
        return same and record.digest == digest(obj)

    def deployment(self, namespace: str, name: str) -> Object | None:
        """The Deployment as the watch last reported it (its status part), if it did."""
        with self._lock:
            return self._deployments.get(("Deployment", namespace, name))

    def forget(self, namespace: str, names: frozenset[str]) -> None:
        """Drop what is known of these children (their SmtpRelay is gone)."""
        with self._lock:
            for store in (self._watched, self._applied, self._deployments):
                for key in [k for k in store if k[1] == namespace and k[2] in names]:
                    del store[key]
