"""SmtpRelay spec → the ConfigMap, Deployment, PVC and Service that run it.

Pure data in, data out: no Kubernetes client, no kopf, no clock. The same spec renders to
byte-identical objects (maps from the spec are sorted, relay.yaml follows the settings
model's field order), which is what lets server-side apply of an unchanged spec be a no-op
and a restarted operator change nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel
from smtprelay.config import RESTART_ONLY_FIELDS, MailSettings, RelayConfig

from smtprelay_operator import api, monitoring

Object = dict[str, Any]

RELAY_YAML = "relay.yaml"
CONFIG_DIR = "/etc/smtprelay"
CONFIG_PATH = f"{CONFIG_DIR}/{RELAY_YAML}"
SPOOL_DIR = "/var/spool/smtprelay"
SECRETS_DIR = "/var/run/secrets/smtprelay"
TLS_DIR = f"{SECRETS_DIR}/tls"
AUTH_DIR = f"{SECRETS_DIR}/auth"
GATEWAY_DIR = f"{SECRETS_DIR}/gateway"
GATEWAY_CA_DIR = f"{SECRETS_DIR}/gateway-ca"
ROUTES_DIR = f"{SECRETS_DIR}/routes"
CA_KEY = "ca.crt"
AUTH_USERS_KEY = "users.yaml"
SMTP_PORT = 2525
METRICS_PORT = 9090
RUN_AS = 10001
SECRET_MODE = 0o440  # group-readable: fsGroup gives the relay user the group
STARTUP_SECONDS = 300

DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
}

_MAIL_KEYS = tuple(field.alias or name for name, field in MailSettings.model_fields.items())


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperatorDefaults:
    """What the operator fills in when the spec leaves it out."""

    relay_image: str
    allowed_images: tuple[str, ...] = ()
    """Image patterns spec.image may use (the installer's allow-list); empty: the default
    image's repository, any tag or digest."""
    resources: Mapping[str, Mapping[str, str]] = dataclasses.field(
        default_factory=lambda: copy.deepcopy(dict(DEFAULT_RESOURCES))
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Owner:
    """The SmtpRelay the objects belong to, for their ownerReferences."""

    name: str
    uid: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rendered:
    """Everything one SmtpRelay becomes."""

    config_map: Object
    deployment: Object
    pvc: Object
    service: Object
    metrics_service: Object
    relay_yaml: str
    config_hash: str
    restart_hash: str
    """The hash of what the relay takes only at start (its listen addresses, spool, workers,
    TLS/AUTH files): the pod template carries it, so only such a change rolls the pod."""

    monitoring: tuple[Object, ...] = ()
    """The PodMonitor and PrometheusRule spec.monitoring asks for (prometheus-operator)."""

    def objects(self) -> tuple[Object, ...]:
        """In apply order: what the pod mounts exists before the Deployment asks for it,
        and nothing else comes before it (the Services select the pod whenever it comes,
        so the pod does not wait for them); monitoring last, so a cluster without
        prometheus-operator holds nothing back."""
        return tuple(obj for stage in (*self.pod_stages(), *self.other_stages()) for obj in stage)

    def pod_stages(self, *, first: bool = False) -> tuple[tuple[Object, ...], ...]:
        """What the relay pod needs to start, stage by stage (a stage's objects may be
        applied side by side): what it mounts (its relay.yaml and its spool claim,
        without which it cannot be scheduled), then its Deployment.

        ``first``: nothing of this SmtpRelay was applied before, so no pod can roll onto
        a relay.yaml that is not in place (a new pod waits for its ConfigMap to mount),
        and the three go side by side, one API round trip sooner."""
        if first:
            return ((self.config_map, self.pvc, self.deployment),)
        return ((self.config_map, self.pvc), (self.deployment,))

    def other_stages(self) -> tuple[tuple[Object, ...], ...]:
        """The rest, which the pod does not wait for: one stage."""
        return ((self.service, self.metrics_service, *self.monitoring),)


def labels(name: str) -> dict[str, str]:
    """The labels on every object of one SmtpRelay (and the operator's watch filter)."""
    return {
        api.NAME_LABEL: "smtprelay",
        api.INSTANCE_LABEL: name,
        api.MANAGED_BY_LABEL: api.MANAGED_BY,
        api.COMPONENT_LABEL: "relay",
    }


def selector(name: str) -> dict[str, str]:
    """The pod selector: only the labels that never change, since a selector is immutable."""
    return {api.NAME_LABEL: "smtprelay", api.INSTANCE_LABEL: name}


def child_names(name: str) -> frozenset[str]:
    """The names of every object one SmtpRelay may own."""
    return frozenset({name, config_map_name(name), pvc_name(name), metrics_service_name(name)})


def config_map_name(name: str) -> str:
    return f"{name}-config"


def pvc_name(name: str) -> str:
    return f"{name}-spool"


def desired_replicas(spec: Mapping[str, Any]) -> int:
    """1, or 0 while suspended: Recreate and one RWO volume allow only one relay pod."""
    return 0 if spec.get("suspended", False) else 1


def retains_spool(spec: Mapping[str, Any]) -> bool:
    return bool(spec.get("storage", {}).get("retainOnDelete", True))


def relay_config(*, name: str, namespace: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The relay.yaml document: the spec's mail settings plus where the pod keeps things."""
    document: dict[str, Any] = {key: copy.deepcopy(spec[key]) for key in _MAIL_KEYS if key in spec}
    document.setdefault("hostname", f"{name}.{namespace}.svc")
    gateway = document.get("gateway")
    if gateway is not None:
        secret = gateway.pop("credentialsSecret", None)
        if secret is not None:
            # The Secret is mounted as a directory; the relay reads its username/password files.
            gateway["credentialsFile"] = GATEWAY_DIR
        if gateway.pop("caSecret", None) is not None:
            gateway["caFile"] = f"{GATEWAY_CA_DIR}/{CA_KEY}"
    for index, route in enumerate(document.get("routes") or []):
        if route.pop("credentialsSecret", None) is not None:
            route["credentialsFile"] = f"{ROUTES_DIR}/{index}/credentials"
        if route.pop("caSecret", None) is not None:
            route["caFile"] = f"{ROUTES_DIR}/{index}/ca/{CA_KEY}"
    document["listen"] = f"0.0.0.0:{SMTP_PORT}"
    document["spoolDir"] = SPOOL_DIR
    document["metricsListen"] = f"0.0.0.0:{METRICS_PORT}"
    if "tls" in spec:
        document["tls"] = {"certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key"}
    if "auth" in spec:
        document["auth"] = {"usersFile": f"{AUTH_DIR}/{AUTH_USERS_KEY}"}
    return _canonical(RelayConfig, document)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _canonical(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its keys in the model's field order, however the API server sent them."""
    out: dict[str, Any] = {}
    for field_name, field in model.model_fields.items():
        key = field.alias or field_name
        if key not in data:
            continue
        nested = _nested_model(field.annotation)
        value = data[key]
        if nested and isinstance(value, Mapping):
            value = _canonical(nested, value)
        elif (item := _list_item_model(field.annotation)) and isinstance(value, list):
            value = [_canonical(item, v) if isinstance(v, Mapping) else v for v in value]
        out[key] = value
    return out


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a ``list[Model]`` field (``routes``), else None."""
    if typing.get_origin(annotation) is list:
        return _nested_model(typing.get_args(annotation)[0])
    return None


def relay_yaml(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(document), sort_keys=False, default_flow_style=False)


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def restart_hash(document: Mapping[str, Any]) -> str:
    """sha256 of the relay.yaml fields a running relay cannot change (RESTART_ONLY_FIELDS)."""
    keys = [RelayConfig.model_fields[name].alias or name for name in RESTART_ONLY_FIELDS]
    part = {key: document[key] for key in keys if key in document}
    return config_hash(yaml.safe_dump(part, sort_keys=True))


def _sorted(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """A user's map in key order, so the rendered object does not depend on input order."""
    items = mapping or {}
    return {key: items[key] for key in sorted(items)}


def _metadata(object_name: str, *, relay: str, namespace: str, owner: Owner | None) -> Object:
    metadata: Object = {"name": object_name, "namespace": namespace, "labels": labels(relay)}
    if owner is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return metadata


def render(
    *,
    name: str,
    namespace: str,
    spec: Mapping[str, Any],
    owner: Owner | None,
    defaults: OperatorDefaults,
) -> Rendered:
    """The four objects for SmtpRelay ``namespace/name``; ``owner`` None leaves out ownerRefs."""
    document = relay_config(name=name, namespace=namespace, spec=spec)
    text = relay_yaml(document)
    restart = restart_hash(document)
    spool_owner = None if retains_spool(spec) else owner
    return Rendered(
        config_map=_config_map(name, namespace, owner, text),
        deployment=_deployment(name, namespace, owner, spec, defaults, restart),
        pvc=_pvc(name, namespace, spool_owner, spec),
        service=_service(name, namespace, owner, spec),
        metrics_service=_metrics_service(name, namespace, owner),
        relay_yaml=text,
        config_hash=config_hash(text),
        restart_hash=restart,
        monitoring=_monitoring(name, namespace, owner, spec),
    )


def _monitoring(
    name: str, namespace: str, owner: Owner | None, spec: Mapping[str, Any]
) -> tuple[Object, ...]:
    asked = spec.get("monitoring") or {}
    extra = _sorted(asked.get("labels"))
    found: list[Object] = []

    def metadata() -> Object:
        meta = _metadata(name, relay=name, namespace=namespace, owner=owner)
        meta["labels"] = {**extra, **meta["labels"]}
        return meta

    if asked.get("podMonitor"):
        found.append(
            monitoring.pod_monitor(
                name=name, namespace=namespace, metadata=metadata(), pod_labels=selector(name)
            )
        )
    if asked.get("prometheusRule"):
        found.append(
            monitoring.prometheus_rule(name=name, namespace=namespace, metadata=metadata())
        )
    return tuple(found)


def _config_map(name: str, namespace: str, owner: Owner | None, text: str) -> Object:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(name), relay=name, namespace=namespace, owner=owner),
        "data": {RELAY_YAML: text},
    }


def _pvc(name: str, namespace: str, owner: Owner | None, spec: Mapping[str, Any]) -> Object:
    storage = spec.get("storage", {})
    claim: Object = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(storage.get("size", "1Gi"))}},
    }
    if storage.get("storageClassName") is not None:
        claim["storageClassName"] = storage["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(pvc_name(name), relay=name, namespace=namespace, owner=owner),
        "spec": claim,
    }


def _service(name: str, namespace: str, owner: Owner | None, spec: Mapping[str, Any]) -> Object:
    service = spec.get("service", {})
    kind = service.get("type", "ClusterIP")
    body: Object = {
        "type": kind,
        "selector": selector(name),
        "ports": [
            {
                "name": "smtp",
                "protocol": "TCP",
                "port": int(service.get("port", 25)),
                "targetPort": "smtp",
            }
        ],
    }
    if kind in ("LoadBalancer", "NodePort"):
        # Keeps the client's address: allowedNetworks must see who really connected.
        body["externalTrafficPolicy"] = "Local"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, relay=name, namespace=namespace, owner=owner),
        "spec": body,
    }


def metrics_service_name(name: str) -> str:
    return f"{name}-metrics"


def _metrics_service(name: str, namespace: str, owner: Owner | None) -> Object:
    """Headless, in-cluster only (never behind the SMTP Service's LoadBalancer): /metrics
    for Prometheus, /config for the operator to read which relay.yaml runs. Not-ready pods
    are listed too: a relay that is not ready is the one whose metrics matter."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(
            metrics_service_name(name), relay=name, namespace=namespace, owner=owner
        ),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(name),
            "ports": [
                {
                    "name": "metrics",
                    "protocol": "TCP",
                    "port": METRICS_PORT,
                    "targetPort": "metrics",
                }
            ],
        },
    }


def _volumes(name: str, spec: Mapping[str, Any]) -> tuple[list[Object], list[Object]]:
    """(volumes, mounts): config, spool and /tmp always; the Secrets the spec names."""
    volumes: list[Object] = [
        {"name": "config", "configMap": {"name": config_map_name(name)}},
        {"name": "spool", "persistentVolumeClaim": {"claimName": pvc_name(name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Object] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "spool", "mountPath": SPOOL_DIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, not the host's /tmp
    ]
    secrets = [
        ("tls", spec.get("tls", {}).get("secretName"), TLS_DIR),
        ("auth", spec.get("auth", {}).get("secretName"), AUTH_DIR),
        ("gateway-credentials", spec.get("gateway", {}).get("credentialsSecret"), GATEWAY_DIR),
        ("gateway-ca", spec.get("gateway", {}).get("caSecret"), GATEWAY_CA_DIR),
    ]
    for index, route in enumerate(spec.get("routes") or []):
        secrets.append(
            (
                f"route-{index}-credentials",
                route.get("credentialsSecret"),
                f"{ROUTES_DIR}/{index}/credentials",
            )
        )
        secrets.append((f"route-{index}-ca", route.get("caSecret"), f"{ROUTES_DIR}/{index}/ca"))
    for volume, secret, path in secrets:
        if secret is None:
            continue
        volumes.append(
            {"name": volume, "secret": {"secretName": secret, "defaultMode": SECRET_MODE}}
        )
        mounts.append({"name": volume, "mountPath": path, "readOnly": True})
    return volumes, mounts


def _container(spec: Mapping[str, Any], defaults: OperatorDefaults, mounts: list[Object]) -> Object:
    def probe(path: str, *, period: int = 10, failures: int = 3) -> Object:
        return {
            "httpGet": {"path": path, "port": "metrics"},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        }

    resources = spec.get("resources") or defaults.resources
    return {
        "name": "relay",
        "image": spec.get("image") or defaults.relay_image,
        "command": ["smtprelay", "serve", "--config", CONFIG_PATH],
        "ports": [
            {"name": "smtp", "containerPort": SMTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        # Liveness waits for start-up (a large spool is scanned first): up to 5 minutes
        # before the kubelet gives up, instead of killing a slow start after 30 s.
        "startupProbe": probe("/healthz", period=2, failures=STARTUP_SECONDS // 2),
        "livenessProbe": probe("/healthz"),
        "readinessProbe": probe("/readyz"),
        "resources": {kind: _sorted(resources[kind]) for kind in sorted(resources)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def _deployment(
    name: str,
    namespace: str,
    owner: Owner | None,
    spec: Mapping[str, Any],
    defaults: OperatorDefaults,
    digest: str,
) -> Object:
    volumes, mounts = _volumes(name, spec)
    annotations = _sorted(spec.get("podAnnotations"))
    # Ours wins: it is what rolls the pod. Mail settings are not in it: the relay takes a
    # new relay.yaml live (the kubelet updates the mounted ConfigMap), without a restart.
    annotations[api.RESTART_HASH_ANNOTATION] = digest
    pod: Object = {
        "automountServiceAccountToken": False,  # the relay never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            # Chown the spool only when its root is not ours yet, not every queued file at
            # every start (slow, and a crash loop with a large queue).
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(spec, defaults, mounts)],
        "volumes": volumes,
    }
    if spec.get("nodeSelector"):
        pod["nodeSelector"] = _sorted(spec["nodeSelector"])
    if spec.get("tolerations"):
        pod["tolerations"] = [_sorted(toleration) for toleration in spec["tolerations"]]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, relay=name, namespace=namespace, owner=owner),
        "spec": {
            "replicas": desired_replicas(spec),
            # One RWO spool volume: the old pod must let go before the new one starts.
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector(name)},
            "template": {
                "metadata": {"labels": labels(name), "annotations": annotations},
                "spec": pod,
            },
        },
    }
