"""ServiceAccounts and their kubeconfigs, so a test can act with only what RBAC grants."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client
from kubernetes.client import ApiException

from devcluster import kubeconfig
from devcluster.controlplane import ControlPlane

# The API server's issuer is also its default audience, so tokens for it authenticate.
AUDIENCE = "https://kubernetes.default.svc.cluster.local"
_CONFLICT = 409


def create_service_account(api: client.ApiClient, *, namespace: str, name: str) -> None:
    """Create the ServiceAccount unless it exists already."""
    body = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
    try:
        client.CoreV1Api(api).create_namespaced_service_account(namespace=namespace, body=body)
    except ApiException as error:
        if error.status != _CONFLICT:
            raise


def request_token(
    api: client.ApiClient, *, namespace: str, name: str, expiration_seconds: int = 3600
) -> str:
    """A bound token from the TokenRequest API: no Secret, expires on its own."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=expiration_seconds)
    )
    response = client.CoreV1Api(api).create_namespaced_service_account_token(
        name=name, namespace=namespace, body=request
    )
    if response.status is None or not response.status.token:
        raise RuntimeError(f"TokenRequest for {namespace}/{name} returned no token")
    return response.status.token


def service_account_kubeconfig(
    plane: ControlPlane,
    *,
    namespace: str,
    name: str,
    path: Path | None = None,
    expiration_seconds: int = 3600,
) -> Path:
    """Create the ServiceAccount if needed and write a kubeconfig that authenticates as it."""
    with plane.api_client() as api:
        create_service_account(api, namespace=namespace, name=name)
        token = request_token(
            api, namespace=namespace, name=name, expiration_seconds=expiration_seconds
        )
    target = path or plane.run_dir / "kubeconfigs" / f"{namespace}.{name}.kubeconfig"
    return kubeconfig.write_token(
        target,
        server=plane.server,
        ca_pem=plane.ca_cert.read_bytes(),
        user=f"system:serviceaccount:{namespace}:{name}",
        token=token,
    )
