"""children and relaycache: what the watch and the operator's own applies tell, kept apart."""

from __future__ import annotations

import copy
from typing import Any

from smtprelay_operator import api
from smtprelay_operator.children import Children
from smtprelay_operator.relaycache import RelayCache, Renders
from smtprelay_operator.render import OperatorDefaults


def _config_map(data: str = "a") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "mail-config", "namespace": "team"},
        "data": {"relay.yaml": data},
    }


def _deployment(replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mail", "namespace": "team"},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {api.RESTART_HASH_ANNOTATION: "r1"}}},
        },
    }


def _as_stored(
    obj: dict[str, Any], version: str, generation: int = 1, *, when: str = "t1", **status: Any
) -> Any:
    """``obj`` as the API server returns it; ``when``: the time on the operator's fields."""
    stored = copy.deepcopy(obj)
    fields = [
        {"manager": "kube-controller-manager", "operation": "Update", "time": "t9"},
        {"manager": api.FIELD_MANAGER, "operation": "Apply", "time": when},
    ]
    stored["metadata"] |= {
        "resourceVersion": version,
        "generation": generation,
        "uid": "u1",
        "managedFields": fields,
    }
    stored["status"] = status
    return stored


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])


class TestChildren:
    def test_the_echo_of_an_apply_is_not_news_and_a_later_change_is(self) -> None:
        children = Children()
        obj = _config_map()
        children.applied(obj, _as_stored(obj, "10"))
        assert not children.watched(_key(obj), _as_stored(obj, "10"))
        assert not children.watched(_key(obj), _as_stored(obj, "10"))  # a re-list repeats it
        assert children.watched(_key(obj), _as_stored(_config_map("hijacked"), "11"))
        assert children.watched(_key(obj), None)

    def test_untouched_only_once_the_watch_confirms_the_apply(self) -> None:
        clock = Clock()
        children = Children(clock=clock)
        obj = _config_map()
        assert not children.untouched(obj, max_age=60)  # never applied
        children.applied(obj, _as_stored(obj, "10"))
        assert not children.untouched(obj, max_age=60)  # the watch has not said so yet
        children.watched(_key(obj), _as_stored(obj, "10"))
        assert children.untouched(obj, max_age=60)
        assert not children.untouched(_config_map("new spec"), max_age=60)
        clock.now += 60
        assert not children.untouched(obj, max_age=60)  # the resync applies it again

    def test_a_change_by_someone_else_or_a_deletion_is_applied_again(self) -> None:
        children = Children()
        obj = _config_map()
        children.applied(obj, _as_stored(obj, "10"))
        children.watched(_key(obj), _as_stored(obj, "10"))
        children.watched(_key(obj), _as_stored(_config_map("hijacked"), "11"))
        assert not children.untouched(obj, max_age=60)
        assert children.before_apply(_key(obj))[1] is not None
        children.watched(_key(obj), None)
        assert not children.untouched(obj, max_age=60)
        assert children.before_apply(_key(obj)) == (True, None)

    def test_a_deployment_status_change_leaves_it_untouched_and_is_kept(self) -> None:
        children = Children()
        obj = _deployment()
        children.applied(obj, _as_stored(obj, "10"))
        children.watched(_key(obj), _as_stored(obj, "10"))
        news = children.watched(_key(obj), _as_stored(obj, "12", availableReplicas=1))
        assert news  # the status is for the SmtpRelay's conditions
        assert children.untouched(obj, max_age=60)
        view = children.deployment("team", "mail")
        assert view is not None
        assert view["status"] == {"availableReplicas": 1}
        assert view["spec"]["replicas"] == 1
        assert view["spec"]["template"]["metadata"]["annotations"] == {
            api.RESTART_HASH_ANNOTATION: "r1"
        }
        # kubectl scale: a new generation, so it is applied again.
        scaled = _as_stored(_deployment(replicas=3), "13", generation=2)
        assert children.watched(_key(obj), scaled)
        assert not children.untouched(obj, max_age=60)

    def test_an_apply_puts_back_only_when_the_operators_fields_changed(self) -> None:
        """A controller's write between the watch's report and the apply (a new
        resourceVersion) is not a repair; an apply that changed the operator's own fields
        (someone had edited them) is; so is one that had to create the object anew."""
        children = Children()
        obj = _config_map()
        assert not children.applied(obj, _as_stored(obj, "10"))  # first sight
        assert not children.applied(obj, _as_stored(obj, "12"))  # someone else's fields
        assert children.applied(obj, _as_stored(obj, "14", when="t2"))  # ours, taken back
        changed = _config_map("new spec")
        assert not children.applied(changed, _as_stored(changed, "16", when="t3"))  # own change
        recreated = _as_stored(changed, "18", when="t3")
        recreated["metadata"]["uid"] = "u2"
        assert children.applied(changed, recreated)

    def test_a_put_back_within_the_same_second_is_still_seen(self) -> None:
        """managedFields times have one-second resolution: an edit and its repair in the
        second of the operator's previous apply leave the stamp as it was. The watch's
        report of the edit and the apply's new version tell instead."""
        children = Children()
        obj = _config_map()
        children.applied(obj, _as_stored(obj, "10"))
        children.watched(_key(obj), _as_stored(_config_map("hijacked"), "11"))
        seen = children.before_apply(_key(obj))[1]
        assert children.applied(obj, _as_stored(obj, "12"), seen=seen)
        # The watch is behind the operator's own apply: a no-op apply is no repair.
        children.applied(obj, _as_stored(obj, "20"), seen=seen)
        assert not children.applied(obj, _as_stored(obj, "20"), seen=seen)

    def test_a_deployment_repair_in_the_same_second_is_told_by_its_generation(self) -> None:
        children = Children()
        obj = _deployment()
        children.applied(obj, _as_stored(obj, "10", generation=1))
        # Its controller's status write is no edit; a no-op apply after it is no repair.
        children.watched(_key(obj), _as_stored(obj, "11", generation=1, availableReplicas=1))
        seen = children.before_apply(_key(obj))[1]
        assert not children.applied(obj, _as_stored(obj, "12", generation=1), seen=seen)
        # kubectl scale, then the apply puts the replicas back.
        children.watched(_key(obj), _as_stored(_deployment(replicas=3), "13", generation=2))
        seen = children.before_apply(_key(obj))[1]
        assert children.applied(obj, _as_stored(obj, "14", generation=3), seen=seen)

    def test_a_pvc_within_the_same_second_is_left_to_the_stamp(self) -> None:
        """Its binding is a controller's write the operator's apply does not undo."""
        children = Children()
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "mail-spool", "namespace": "team"},
            "spec": {"resources": {"requests": {"storage": "1Gi"}}},
        }
        children.applied(pvc, _as_stored(pvc, "10"))
        children.watched(_key(pvc), _as_stored(pvc, "11", phase="Bound"))
        seen = children.before_apply(_key(pvc))[1]
        assert not children.applied(pvc, _as_stored(pvc, "12", phase="Bound"), seen=seen)

    def test_a_pvc_bound_by_its_controller_is_no_news_and_stays_untouched(self) -> None:
        """The PV controller's two writes (volumeName and annotations, then the phase) leave
        the operator's fields as applied: no reconcile, no apply. An edit of them is news."""
        children = Children()
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "mail-spool", "namespace": "team", "labels": {"a": "b"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"s": "1Gi"}}},
        }
        children.applied(pvc, _as_stored(pvc, "10"))
        assert not children.watched(_key(pvc), _as_stored(pvc, "10"))
        bound = _as_stored(pvc, "11")
        bound["metadata"]["annotations"] = {"pv.kubernetes.io/bind-completed": "yes"}
        bound["metadata"]["labels"]["added-by-someone"] = "x"
        bound["spec"] |= {"volumeName": "pv-1", "volumeMode": "Filesystem"}
        assert not children.watched(_key(pvc), bound)
        bound = copy.deepcopy(bound)
        bound["metadata"]["resourceVersion"] = "12"
        bound["status"] = {"phase": "Bound"}
        assert not children.watched(_key(pvc), bound)
        assert children.untouched(pvc, max_age=60)
        edited = copy.deepcopy(bound)
        edited["metadata"]["resourceVersion"] = "13"
        edited["metadata"]["labels"]["a"] = "changed"
        assert children.watched(_key(pvc), edited)
        assert not children.untouched(pvc, max_age=60)
        widened = copy.deepcopy(bound)
        widened["metadata"]["resourceVersion"] = "14"
        widened["spec"]["accessModes"] = ["ReadWriteOnce", "ReadOnlyMany"]
        assert children.watched(_key(pvc), widened)
        assert not children.untouched(pvc, max_age=60)

    def test_a_config_map_changed_in_fields_not_the_operators_is_still_news(self) -> None:
        """Only the kinds controllers write are looked into; any other change is news."""
        children = Children()
        obj = _config_map()
        children.applied(obj, _as_stored(obj, "10"))
        annotated = _as_stored(obj, "11")
        annotated["metadata"]["annotations"] = {"someone": "else"}
        assert children.watched(_key(obj), annotated)
        assert not children.untouched(obj, max_age=60)

    def test_forget_drops_a_gone_relays_children(self) -> None:
        children = Children()
        obj = _deployment()
        children.applied(obj, _as_stored(obj, "10"))
        children.watched(_key(obj), _as_stored(obj, "10"))
        children.forget("team", frozenset({"mail"}))
        assert children.deployment("team", "mail") is None
        assert children.before_apply(_key(obj)) == (False, None)


def _relay(version: str, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": "mail",
            "namespace": "team",
            "uid": "u1",
            "generation": 1,
            "resourceVersion": version,
            "managedFields": [{"manager": "kubectl"}] * 50,
        },
        "spec": {"delivery": {"tries": 3}},
        "status": status,
    }


class TestRelayCache:
    def test_keeps_what_a_reconcile_reads_and_not_managed_fields(self) -> None:
        cache = RelayCache()
        assert cache.note(_relay("5")) == ("team", "mail")
        held = cache.get("team", "mail")
        assert held is not None
        assert "managedFields" not in held["metadata"]
        assert held["metadata"]["uid"] == "u1"
        assert held["spec"] == {"delivery": {"tries": 3}}
        cache.note(_relay("6"), deleted=True)
        assert cache.get("team", "mail") is None

    def test_an_own_write_never_replaces_a_later_watch_event(self) -> None:
        cache = RelayCache()
        cache.note(_relay("5"))
        cache.replaced(_relay("5"), _relay("6", observedGeneration=1))
        assert cache.get("team", "mail")["metadata"]["resourceVersion"] == "6"  # type: ignore[index]
        cache.note(_relay("8"))  # someone changed it after
        cache.replaced(_relay("6"), _relay("7", observedGeneration=1))
        assert cache.get("team", "mail")["metadata"]["resourceVersion"] == "8"  # type: ignore[index]


class TestRenders:
    def test_one_render_per_generation(self) -> None:
        """A second pass or a status refresh of the same generation renders nothing again;
        a new generation (a spec change) or a new uid (a new SmtpRelay) does."""
        renders, defaults = Renders(size=2), OperatorDefaults(relay_image="r/i:1")
        first = renders.of(_relay("5"), defaults)
        assert renders.of(_relay("6", observedGeneration=1), defaults) is first
        changed = _relay("7")
        changed["metadata"]["generation"] = 2
        changed["spec"] = {"delivery": {"tries": 4}}
        second = renders.of(changed, defaults)
        assert second is not first
        assert "tries: 4" in second.relay_yaml
        assert "tries: 3" in first.relay_yaml
        other = _relay("8")
        other["metadata"]["uid"] = "u2"
        assert renders.of(other, defaults) is not first
        assert renders.of(_relay("9"), defaults) is not first  # the oldest of 3 went (size 2)
