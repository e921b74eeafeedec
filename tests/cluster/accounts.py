"""ServiceAccounts moved to `devcluster.accounts`; this keeps `tests.cluster` imports working."""

from devcluster.accounts import (
    create_service_account,
    request_token,
    service_account_kubeconfig,
)

__all__ = ["create_service_account", "request_token", "service_account_kubeconfig"]
