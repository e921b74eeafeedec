"""The few Kubernetes API calls the operator makes, as plain dicts in and out.

Only this module talks to the API server (kopf's own watching aside). Objects stay dicts,
exactly as `render` produced them, so what is applied is byte for byte what was rendered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from kubernetes import client, config
from kubernetes.client import ApiException

from smtprelay_operator import api, metrics

Object = dict[str, Any]

NOT_FOUND: Final = 404
CONFLICT: Final = 409
# (connect, read) seconds for every request: a half-open connection or a stuck webhook
# fails the request, which is retried with backoff, instead of blocking a worker forever.
REQUEST_TIMEOUT: Final = (5.0, 30.0)
_METADATA_ONLY: Final = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"

_COLLECTIONS: Final = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{namespace}/configmaps",
    ("v1", "PersistentVolumeClaim"): "/api/v1/namespaces/{namespace}/persistentvolumeclaims",
    ("v1", "Service"): "/api/v1/namespaces/{namespace}/services",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{namespace}/deployments",
    (api.API_VERSION, api.KIND): f"/apis/{api.API_VERSION}/namespaces/{{namespace}}/{api.PLURAL}",
    ("v1", "Event"): "/api/v1/namespaces/{namespace}/events",
    ("v1", "Secret"): "/api/v1/namespaces/{namespace}/secrets",
    ("monitoring.coreos.com/v1", "PodMonitor"): (
        "/apis/monitoring.coreos.com/v1/namespaces/{namespace}/podmonitors"
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        "/apis/monitoring.coreos.com/v1/namespaces/{namespace}/prometheusrules"
    ),
}


def load_api_client(*, connections: int = 10) -> client.ApiClient:
    """In a pod, the ServiceAccount; elsewhere, $KUBECONFIG or ~/.kube/config.

    ``connections``: kept open to the API server, at least one per reconcile worker (the
    client's default, 5 per CPU, would make workers wait for each other on small nodes).
    """
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = connections
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration)


def path_of(api_version: str, kind: str, *, namespace: str, name: str) -> str:
    return f"{_COLLECTIONS[api_version, kind].format(namespace=namespace)}/{name}"


class Kube:
    """Server-side apply, get, delete and status writes for the operator's handful of kinds."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        self._client = api_client
        self._timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Object:
        params = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": accept},
            body=body,
            auth_settings=["BearerToken"],
        )
        metrics.API_REQUESTS.labels(method=method).inc()
        response = self._client.call_api(*params, _request_timeout=self._timeout)
        response.read()  # type: ignore[no-untyped-call]
        text = bytes(response.data or b"").decode("utf-8")
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=text, data=None)
        result: Object = json.loads(text)
        return result

    def apply(self, obj: Mapping[str, Any]) -> Object:
        """Server-side apply as the operator's field manager, taking back fields others changed.

        Fields other managers set and the operator does not render are left alone, so the
        operator never fights them; applying unchanged content changes nothing.
        """
        metadata = obj["metadata"]
        path = path_of(
            obj["apiVersion"], obj["kind"], namespace=metadata["namespace"], name=metadata["name"]
        )
        return self._request(
            "PATCH",
            path,
            query=[("fieldManager", api.FIELD_MANAGER), ("force", "true")],
            body=dict(obj),
            content_type="application/apply-patch+yaml",
        )

    def get(self, api_version: str, kind: str, *, namespace: str, name: str) -> Object | None:
        """The object, or None when it does not exist."""
        try:
            return self._request("GET", path_of(api_version, kind, namespace=namespace, name=name))
        except ApiException as error:
            if error.status == NOT_FOUND:
                return None
            raise

    def delete(self, api_version: str, kind: str, *, namespace: str, name: str, uid: str) -> bool:
        """Delete the object if it is still the one with ``uid`` (a precondition the API
        server checks); False when it is gone already or is another object now."""
        try:
            self._request(
                "DELETE",
                path_of(api_version, kind, namespace=namespace, name=name),
                body={"preconditions": {"uid": uid}, "propagationPolicy": "Background"},
            )
        except ApiException as error:
            if error.status in (NOT_FOUND, CONFLICT):
                return False
            raise
        return True

    def replace_status(self, relay: Mapping[str, Any], status: Mapping[str, Any]) -> Object:
        """Write an SmtpRelay's status, failing with 409 if it changed since it was read."""
        metadata = relay["metadata"]
        path = path_of(
            api.API_VERSION, api.KIND, namespace=metadata["namespace"], name=metadata["name"]
        )
        patch = {"metadata": {"resourceVersion": metadata["resourceVersion"]}, "status": status}
        return self._request(
            "PATCH", f"{path}/status", body=patch, content_type="application/merge-patch+json"
        )

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> Object:
        return self._request(
            "POST", _COLLECTIONS["v1", "Event"].format(namespace=namespace), body=dict(event)
        )

    def get_event(self, namespace: str, name: str) -> Object | None:
        return self.get("v1", "Event", namespace=namespace, name=name)

    def patch_event(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Object:
        return self._request(
            "PATCH",
            path_of("v1", "Event", namespace=namespace, name=name),
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    def secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's labels, or None when it does not exist.

        Asked for as PartialObjectMetadata: the API server sends the metadata only, so the
        Secret's data never reaches the operator (RBAC cannot express "metadata only"; the
        request can).
        """
        try:
            meta = self._request(
                "GET",
                path_of("v1", "Secret", namespace=namespace, name=name),
                accept=_METADATA_ONLY,
            )
        except ApiException as error:
            if error.status == NOT_FOUND:
                return None
            raise
        labels: dict[str, str] = (meta.get("metadata") or {}).get("labels") or {}
        return labels
