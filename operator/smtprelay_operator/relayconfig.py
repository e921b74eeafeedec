"""Ask a relay which relay.yaml it runs: GET /config on its metrics port.

The relay reads a new relay.yaml without a restart, once the kubelet has updated the mounted
ConfigMap (up to about a minute after the operator applied it). Nothing in the pod's status
says when that happened, and the relay has no API credentials to say it itself, so the
operator asks the relay: through the headless ``<name>-metrics`` Service, the same way
Prometheus reaches it. See operator/README.md for the alternatives weighed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Final

from smtprelay_operator.status import Running

DEFAULT_URL: Final = "http://{name}-metrics.{namespace}.svc:9090/config"
TIMEOUT: Final = 2.0
_LIMIT: Final = 64 * 1024  # a /config answer is a few hundred bytes


def url_for(template: str, *, name: str, namespace: str) -> str:
    return template.format(name=name, namespace=namespace)


def running(url: str, *, timeout: float = TIMEOUT) -> tuple[Running, str | None, list[str]]:
    """(what runs, the hash of the last version refused, its problems)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only, from the operator's own flag
            state = json.loads(response.read(_LIMIT))
    except (OSError, ValueError) as error:
        return Running(error=f"{url}: {error}"), None, []
    if not isinstance(state, dict):
        return Running(error=f"{url}: not a JSON object"), None, []
    refused = state.get("refused") if isinstance(state.get("refused"), dict) else None
    problems = [str(p) for p in (refused or {}).get("problems") or []]
    return (
        Running(hash=str(state["hash"]) if state.get("hash") else None),
        str(refused["hash"]) if refused and refused.get("hash") else None,
        problems,
    )
