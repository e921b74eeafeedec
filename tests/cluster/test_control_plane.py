"""The test control plane behaves like a real cluster where the operator depends on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from devcluster import build
from devcluster.controlplane import NODE_NAME, ControlPlane, wait_for

pytestmark = pytest.mark.cluster

_FORBIDDEN = 403
_NOT_FOUND = 404
_CONFLICT = 409
_INVALID = 422
_CEL_MESSAGE = "triesBeforeGateway must be less than tries"
_GROUP = "cluster-test.smtprelay.dev"


def _widget_crd() -> client.V1CustomResourceDefinition:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["tries", "triesBeforeGateway"],
                "properties": {
                    "tries": {"type": "integer", "minimum": 1},
                    "triesBeforeGateway": {"type": "integer", "minimum": 0},
                },
                "x-kubernetes-validations": [
                    {"rule": "self.triesBeforeGateway < self.tries", "message": _CEL_MESSAGE}
                ],
            }
        },
    }
    crd = client.V1CustomResourceDefinition.from_dict(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"widgets.{_GROUP}"},
            "spec": {
                "group": _GROUP,
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": schema},
                    }
                ],
            },
        }
    )
    assert crd is not None
    return crd


def _widget(name: str, *, tries: int, before_gateway: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{_GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"tries": tries, "triesBeforeGateway": before_gateway},
    }


def _gone(read: Callable[[], object]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            read()
        except ApiException as error:
            if error.status == _NOT_FOUND:
                return True
            raise
        return False

    return check


class TestVersion:
    def test_reports_pinned_release(self, kube_api: client.ApiClient) -> None:
        """/version reports the pinned tag, so ldflags reached the binary."""
        assert client.VersionApi(kube_api).get_code().git_version == build.KUBERNETES_VERSION

    def test_kubectl_waits_on_the_fake_node(self, control_plane: ControlPlane) -> None:
        """The built kubectl talks to the cluster and sees the kwok node Ready."""
        out = control_plane.kubectl(
            "wait", "--for=condition=Ready", f"node/{NODE_NAME}", "--timeout=30s"
        )
        assert "condition met" in out


class TestCustomResourceValidation:
    def test_cel_rule_refuses_object_with_its_message(
        self, kube_api: client.ApiClient, kube_namespace: str
    ) -> None:
        """A CRD's x-kubernetes-validations rule refuses a breaking object with its message."""
        extensions = client.ApiextensionsV1Api(kube_api)
        crd = extensions.create_custom_resource_definition(_widget_crd())
        try:

            def established() -> bool:
                status = extensions.read_custom_resource_definition(f"widgets.{_GROUP}").status
                conditions = (status.conditions if status else None) or []
                return any(c.type == "Established" and c.status == "True" for c in conditions)

            wait_for(established, timeout=30, what="the Widget CRD to be established")
            objects = client.CustomObjectsApi(kube_api)

            def create(body: dict[str, Any]) -> object:
                return objects.create_namespaced_custom_object(
                    _GROUP, "v1", kube_namespace, "widgets", body
                )

            # Discovery of a new CRD can lag its Established condition by a moment.
            def accepted() -> bool:
                try:
                    create(_widget("good", tries=5, before_gateway=2))
                except ApiException as error:
                    if error.status == _NOT_FOUND:
                        return False
                    raise
                return True

            wait_for(accepted, timeout=30, what="a valid Widget to be accepted")
            with pytest.raises(ApiException) as refused:
                create(_widget("bad", tries=3, before_gateway=3))
            assert refused.value.status == _INVALID
            assert _CEL_MESSAGE in json.loads(refused.value.body or "{}")["message"]
        finally:
            assert crd.metadata is not None
            assert crd.metadata.name is not None
            extensions.delete_custom_resource_definition(crd.metadata.name)


class TestWorkloads:
    def test_deployment_pods_become_ready_on_kwok_node(
        self, kube_api: client.ApiClient, kube_namespace: str
    ) -> None:
        """A Deployment's pods are scheduled onto the kwok node and turn Running and Ready."""
        labels = {"app": "demo"}
        deployment = client.V1Deployment.from_dict(
            {
                "metadata": {"name": "demo"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
                    },
                },
            }
        )
        assert deployment is not None
        apps = client.AppsV1Api(kube_api)
        apps.create_namespaced_deployment(kube_namespace, deployment)

        def ready() -> bool:
            status = apps.read_namespaced_deployment("demo", kube_namespace).status
            return status is not None and status.ready_replicas == 2

        wait_for(ready, timeout=60, what="deployment demo to have 2 ready replicas")
        pods = client.CoreV1Api(kube_api).list_namespaced_pod(
            kube_namespace, label_selector="app=demo"
        )
        assert len(pods.items) == 2
        for pod in pods.items:
            assert pod.spec is not None
            assert pod.spec.node_name == NODE_NAME
            assert pod.status is not None
            assert pod.status.phase == "Running"
            conditions = pod.status.conditions or []
            assert any(c.type == "Ready" and c.status == "True" for c in conditions)

    def test_deleting_owner_collects_dependents(
        self, kube_api: client.ApiClient, kube_namespace: str
    ) -> None:
        """The garbage collector deletes an object once its owner is gone."""
        core = client.CoreV1Api(kube_api)
        owner = core.create_namespaced_config_map(
            kube_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
        )
        assert owner.metadata is not None
        assert owner.metadata.uid is not None
        reference = client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
        )
        core.create_namespaced_config_map(
            kube_namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="dependent", owner_references=[reference])
            ),
        )
        core.delete_namespaced_config_map("owner", kube_namespace, propagation_policy="Background")
        wait_for(
            _gone(lambda: core.read_namespaced_config_map("dependent", kube_namespace)),
            timeout=60,
            what="the dependent ConfigMap to be garbage-collected",
        )


class TestAuthorization:
    def test_service_account_needs_a_role(
        self,
        kube_api: client.ApiClient,
        kube_namespace: str,
        control_plane: ControlPlane,
        service_account_kubeconfig: Callable[..., Path],
    ) -> None:
        """A ServiceAccount is refused (403) until a RoleBinding grants it the verb."""
        config_file = service_account_kubeconfig(namespace=kube_namespace, name="reader")
        with control_plane.api_client(config_file) as as_reader:
            reader = client.CoreV1Api(as_reader)
            with pytest.raises(ApiException) as refused:
                reader.list_namespaced_config_map(kube_namespace)
            assert refused.value.status == _FORBIDDEN

            rbac = client.RbacAuthorizationV1Api(kube_api)
            rbac.create_namespaced_role(
                kube_namespace,
                client.V1Role(
                    metadata=client.V1ObjectMeta(name="read-configmaps"),
                    rules=[
                        client.V1PolicyRule(
                            api_groups=[""], resources=["configmaps"], verbs=["get", "list"]
                        )
                    ],
                ),
            )
            rbac.create_namespaced_role_binding(
                kube_namespace,
                client.V1RoleBinding(
                    metadata=client.V1ObjectMeta(name="reader-reads-configmaps"),
                    role_ref=client.V1RoleRef(
                        api_group="rbac.authorization.k8s.io", kind="Role", name="read-configmaps"
                    ),
                    subjects=[
                        client.RbacV1Subject(
                            kind="ServiceAccount", name="reader", namespace=kube_namespace
                        )
                    ],
                ),
            )

            def allowed() -> bool:
                try:
                    reader.list_namespaced_config_map(kube_namespace)
                except ApiException as error:
                    if error.status == _FORBIDDEN:
                        return False
                    raise
                return True

            wait_for(allowed, timeout=30, what="the RoleBinding to take effect")
            with pytest.raises(ApiException) as still_refused:
                reader.list_namespaced_secret(kube_namespace)
            assert still_refused.value.status == _FORBIDDEN


class TestServerSideApply:
    def test_apply_tracks_field_owners_and_conflicts(
        self, kube_api: client.ApiClient, kube_namespace: str
    ) -> None:
        """Server-side apply creates, refuses a second manager's change, and yields to force."""
        core = client.CoreV1Api(kube_api)

        def apply(manager: str, value: str, *, force: bool = False) -> client.V1ConfigMap:
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "applied"},
                "data": {"queueTimer": value},
            }
            return core.patch_namespaced_config_map(
                "applied",
                kube_namespace,
                body,
                field_manager=manager,
                force=force or None,
                _content_type="application/apply-patch+yaml",
            )

        assert apply("alice", "30m").data == {"queueTimer": "30m"}
        with pytest.raises(ApiException) as conflict:
            apply("bob", "90s")
        assert conflict.value.status == _CONFLICT

        forced = apply("bob", "90s", force=True)
        assert forced.data == {"queueTimer": "90s"}
        assert forced.metadata is not None
        owners = {
            entry.manager
            for entry in forced.metadata.managed_fields or []
            if entry.operation == "Apply" and "f:queueTimer" in json.dumps(entry.fields_v1)
        }
        assert owners == {"bob"}
