"""render: an SmtpRelay spec → ConfigMap, Deployment, PVC and Service, with no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from smtprelay.config import parse_config
from smtprelay_operator import api, render

DEFAULTS = render.OperatorDefaults(relay_image="registry.example/smtprelay:test")
OWNER = render.Owner(name="mail", uid="0b1c2d3e-0000-4000-8000-000000000001")


def make(
    spec: dict[str, Any] | None = None, *, owner: render.Owner | None = OWNER
) -> render.Rendered:
    return render.render(
        name="mail", namespace="team-a", spec=spec or {}, owner=owner, defaults=DEFAULTS
    )


def relay_document(rendered: render.Rendered) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(rendered.config_map["data"]["relay.yaml"])
    return document


def pod_spec(rendered: render.Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = rendered.deployment["spec"]["template"]["spec"]
    return spec


FULL_SPEC: dict[str, Any] = {
    "hostname": "relay.example.com",
    "allowedNetworks": ["10.0.0.0/8"],
    "maxMessageSize": "10Mi",
    "defaultMailHost": "mail.example.com",
    "dnsServers": ["10.0.0.53", "[fd00::53]:5353"],
    "delivery": {"tries": 10, "queueTimer": "5m", "port": 2525, "concurrency": 5},
    "gateway": {
        "host": "gw.example.com:587",
        "sendAll": False,
        "triesBeforeGateway": 2,
        "credentialsSecret": "gw-login",
    },
    "logging": {"target": "syslog", "syslogServer": "logs.example.com", "debug": True},
    "tls": {"secretName": "mail-tls"},
    "auth": {"secretName": "mail-users"},
    "suspended": False,
    "storage": {"size": "5Gi", "storageClassName": "fast", "retainOnDelete": False},
    "service": {"type": "LoadBalancer", "port": 2525},
    "image": "registry.example/smtprelay:custom",
    "resources": {"limits": {"memory": "256Mi"}, "requests": {"memory": "64Mi", "cpu": "50m"}},
    "nodeSelector": {"zone": "b", "disk": "ssd"},
    "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
    "podAnnotations": {"b.example/x": "1", "a.example/y": "2"},
}


class TestDeterminism:
    def test_same_spec_renders_byte_identical_objects(self) -> None:
        """Rendering twice gives the same bytes, so SSA of an unchanged spec is a no-op."""
        first = json.dumps([make(FULL_SPEC).objects()])
        second = json.dumps([make(json.loads(json.dumps(FULL_SPEC))).objects()])
        assert first == second

    def test_key_order_of_the_spec_does_not_matter(self) -> None:
        """The API server may send keys in any order; the rendered objects do not change."""
        reordered = {key: FULL_SPEC[key] for key in reversed(list(FULL_SPEC))}
        reordered["delivery"] = dict(reversed(list(FULL_SPEC["delivery"].items())))
        reordered["nodeSelector"] = dict(reversed(list(FULL_SPEC["nodeSelector"].items())))
        assert json.dumps(make(reordered).objects()) == json.dumps(make(FULL_SPEC).objects())

    def test_render_does_not_mutate_the_spec(self) -> None:
        """The spec kopf hands over is left as it was."""
        spec = json.loads(json.dumps(FULL_SPEC))
        make(spec)
        assert spec == FULL_SPEC


class TestConfigMap:
    def test_relay_yaml_validates_with_the_relays_own_parser(self) -> None:
        """What the operator writes is what the relay accepts, for every field in the spec."""
        config = parse_config(relay_document(make(FULL_SPEC)))
        assert config.delivery.tries == 10
        assert config.delivery.queue_timer == 300.0
        assert config.gateway.host == "gw.example.com:587"

    def test_an_empty_spec_renders_a_valid_relay_yaml(self) -> None:
        """With nothing set, the relay's defaults apply and the hostname is the Service's."""
        config = parse_config(relay_document(make({})))
        assert config.hostname == "mail.team-a.svc"

    def test_pod_paths_are_filled_in(self) -> None:
        """listen, spool, metrics, TLS, AUTH and gateway credentials point into the pod."""
        document = relay_document(make(FULL_SPEC))
        assert document["listen"] == "0.0.0.0:2525"
        assert document["spoolDir"] == "/var/spool/smtprelay"
        assert document["metricsListen"] == "0.0.0.0:9090"
        assert document["tls"] == {
            "certFile": f"{render.TLS_DIR}/tls.crt",
            "keyFile": f"{render.TLS_DIR}/tls.key",
        }
        assert document["auth"] == {"usersFile": f"{render.AUTH_DIR}/users.yaml"}
        assert document["gateway"]["credentialsFile"] == render.GATEWAY_DIR
        assert "credentialsSecret" not in document["gateway"]

    def test_operator_only_fields_stay_out_of_relay_yaml(self) -> None:
        """Storage, Service, image and pod settings are not the relay's business."""
        document = relay_document(make(FULL_SPEC))
        for key in ("suspended", "storage", "service", "image", "resources", "podAnnotations"):
            assert key not in document

    def test_config_map_name_and_key(self) -> None:
        """ConfigMap <name>-config holds relay.yaml."""
        config_map = make().config_map
        assert config_map["metadata"]["name"] == "mail-config"
        assert list(config_map["data"]) == ["relay.yaml"]


class TestConfigHash:
    def test_hash_is_sha256_of_relay_yaml_and_not_on_the_pod_template(self) -> None:
        """configHash is the sha256 of relay.yaml; the pod template carries only the restart
        hash, so a mail-settings change reaches the relay without a new pod."""
        rendered = make(FULL_SPEC)
        annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
        assert rendered.config_hash == render.config_hash(rendered.relay_yaml)
        assert annotations[api.RESTART_HASH_ANNOTATION] == rendered.restart_hash
        assert rendered.config_hash not in annotations.values()

    def test_mail_settings_change_keeps_the_pod_template(self) -> None:
        """Gateway, tries, timer, logging, networks: a new relay.yaml, the same pod template."""
        before = make({"gateway": {"host": "a.example.com"}})
        after = make(
            {
                "gateway": {"host": "b.example.com", "sendAll": True},
                "delivery": {"tries": 5, "queueTimer": "1m"},
                "logging": {"target": "stdout", "debug": True},
                "allowedNetworks": ["10.1.0.0/16"],
            }
        )
        assert before.config_hash != after.config_hash
        assert before.deployment == after.deployment

    def test_what_needs_a_restart_rolls_the_pod(self) -> None:
        """workers, or a TLS certificate (new files and mounts), change the restart hash."""
        base = make({}).restart_hash
        assert make({"workers": 2}).restart_hash != base
        assert make({"tls": {"secretName": "cert"}}).restart_hash != base

    def test_hash_changes_with_the_config(self) -> None:
        """Changing the gateway host changes the hash."""
        before = make({"gateway": {"host": "a.example.com"}}).config_hash
        after = make({"gateway": {"host": "b.example.com"}}).config_hash
        assert before != after

    def test_hash_ignores_operator_only_fields(self) -> None:
        """Suspending or resizing storage does not count as a config change."""
        base = make({}).config_hash
        assert make({"suspended": True, "storage": {"size": "9Gi"}}).config_hash == base

    def test_pod_annotations_cannot_override_the_hash(self) -> None:
        """A user's podAnnotations never replace the restart hash."""
        rendered = make({"podAnnotations": {api.RESTART_HASH_ANNOTATION: "mine"}})
        annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations[api.RESTART_HASH_ANNOTATION] == rendered.restart_hash


class TestDeployment:
    def test_one_replica_recreate(self) -> None:
        """One relay pod, replaced (not surged) because the spool volume is ReadWriteOnce."""
        spec = make().deployment["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}

    def test_suspended_scales_to_zero(self) -> None:
        """suspended: true → 0 replicas; false → 1."""
        assert make({"suspended": True}).deployment["spec"]["replicas"] == 0
        assert make({"suspended": False}).deployment["spec"]["replicas"] == 1

    def test_pod_security_context(self) -> None:
        """Non-root 10001, fsGroup 10001 applied only when the volume root is not yet ours
        (not a chown of every queued file at every start), RuntimeDefault seccomp."""
        assert pod_spec(make())["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        }

    def test_container_security_context(self) -> None:
        """Read-only root, no privilege escalation, every capability dropped."""
        context = pod_spec(make())["containers"][0]["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["runAsNonRoot"] is True

    def test_container_command_ports_and_probes(self) -> None:
        """serve with the mounted config; smtp 2525 and metrics 9090; probes on metrics."""
        container = pod_spec(make())["containers"][0]
        assert container["command"] == [
            "smtprelay",
            "serve",
            "--config",
            "/etc/smtprelay/relay.yaml",
        ]
        assert [(port["name"], port["containerPort"]) for port in container["ports"]] == [
            ("smtp", 2525),
            ("metrics", 9090),
        ]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    def test_startup_probe_gives_a_large_spool_time(self) -> None:
        """A startupProbe holds liveness off for up to 5 minutes while the spool is loaded."""
        probe = pod_spec(make())["containers"][0]["startupProbe"]
        assert probe["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert probe["periodSeconds"] * probe["failureThreshold"] == 300

    def test_volumes_spool_config_and_tmp(self) -> None:
        """The spool PVC at /var/spool/smtprelay, config at /etc/smtprelay, an emptyDir /tmp."""
        pod = pod_spec(make())
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert mounts == {
            "config": "/etc/smtprelay",
            "spool": "/var/spool/smtprelay",
            "tmp": "/tmp",  # noqa: S108 - an emptyDir mount path
        }
        assert volumes["spool"]["persistentVolumeClaim"] == {"claimName": "mail-spool"}
        assert volumes["config"]["configMap"] == {"name": "mail-config"}
        assert volumes["tmp"]["emptyDir"] == {}

    def test_secrets_are_mounted_where_relay_yaml_points(self) -> None:
        """TLS, AUTH users and gateway credentials Secrets land at the paths relay.yaml names."""
        pod = pod_spec(make(FULL_SPEC))
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert secrets == {
            "tls": "mail-tls",
            "auth": "mail-users",
            "gateway-credentials": "gw-login",
        }
        assert mounts["tls"] == render.TLS_DIR
        assert mounts["auth"] == render.AUTH_DIR
        assert mounts["gateway-credentials"] == render.GATEWAY_DIR

    def test_ca_and_route_secrets_become_read_only_mounts_and_paths(self) -> None:
        """gateway.caSecret and each route's caSecret/credentialsSecret: mounted read-only,
        and relay.yaml names the files there (ca.crt, the credentials directory)."""
        spec = {
            "gateway": {"hosts": ["gw1.example.com", "gw2.example.com"], "caSecret": "gw-ca"},
            "routes": [
                {"domains": ["a.example"], "direct": True},
                {
                    "domains": [".b.example"],
                    "via": ["mx.b.example:465"],
                    "implicitTls": True,
                    "caSecret": "b-ca",
                    "credentialsSecret": "b-login",
                },
            ],
        }
        rendered = make(spec)
        document = relay_document(rendered)
        assert document["gateway"]["caFile"] == f"{render.GATEWAY_CA_DIR}/ca.crt"
        assert document["routes"][1]["caFile"] == f"{render.ROUTES_DIR}/1/ca/ca.crt"
        assert document["routes"][1]["credentialsFile"] == f"{render.ROUTES_DIR}/1/credentials"
        assert "caSecret" not in document["routes"][1]
        config = parse_config(document)
        assert config.routes[1].tls_level == "verify"
        pod = pod_spec(rendered)
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert secrets == {
            "gateway-ca": "gw-ca",
            "route-1-ca": "b-ca",
            "route-1-credentials": "b-login",
        }
        assert mounts["gateway-ca"]["mountPath"] == render.GATEWAY_CA_DIR
        assert mounts["route-1-ca"]["mountPath"] == f"{render.ROUTES_DIR}/1/ca"
        assert all(mounts[name]["readOnly"] for name in secrets)

    def test_pod_settings_from_the_spec(self) -> None:
        """image, resources, nodeSelector, tolerations and podAnnotations reach the pod."""
        rendered = make(FULL_SPEC)
        pod = pod_spec(rendered)
        container = pod["containers"][0]
        assert container["image"] == "registry.example/smtprelay:custom"
        assert container["resources"] == FULL_SPEC["resources"]
        assert pod["nodeSelector"] == {"disk": "ssd", "zone": "b"}
        assert pod["tolerations"] == [{"effect": "NoSchedule", "key": "mail", "operator": "Exists"}]
        annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["a.example/y"] == "2"
        assert pod["terminationGracePeriodSeconds"] == 30

    def test_operator_defaults_fill_image_and_resources(self) -> None:
        """Without spec.image/resources, the operator's defaults are used."""
        container = pod_spec(make())["containers"][0]
        assert container["image"] == DEFAULTS.relay_image
        assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}


class TestPersistentVolumeClaim:
    def test_claim_size_class_and_access_mode(self) -> None:
        """<name>-spool, ReadWriteOnce, the requested size and class."""
        pvc = make(FULL_SPEC).pvc
        assert pvc["metadata"]["name"] == "mail-spool"
        assert pvc["spec"] == {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "5Gi"}},
            "storageClassName": "fast",
        }

    def test_no_storage_class_means_the_cluster_default(self) -> None:
        """storageClassName is left out unless set, so the default StorageClass applies."""
        pvc = make().pvc
        assert "storageClassName" not in pvc["spec"]
        assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"

    def test_retained_spool_has_no_owner_reference(self) -> None:
        """retainOnDelete (the default) keeps the PVC out of garbage collection."""
        assert "ownerReferences" not in make().pvc["metadata"]
        assert "ownerReferences" not in make({"storage": {"retainOnDelete": True}}).pvc["metadata"]

    def test_unretained_spool_is_owned(self) -> None:
        """retainOnDelete: false gives the PVC an ownerReference, so GC deletes it."""
        pvc = make({"storage": {"retainOnDelete": False}}).pvc
        assert pvc["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


class TestOwnershipAndLabels:
    @pytest.mark.parametrize("kind", ["config_map", "deployment", "service"])
    def test_owner_reference_points_at_the_smtprelay(self, kind: str) -> None:
        """ConfigMap, Deployment and Service are controlled by their SmtpRelay."""
        references = getattr(make(), kind)["metadata"]["ownerReferences"]
        assert references == [
            {
                "apiVersion": "smtprelay.dev/v1alpha1",
                "kind": "SmtpRelay",
                "name": "mail",
                "uid": OWNER.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]

    def test_every_object_carries_the_labels(self) -> None:
        """app.kubernetes.io/{name,instance,managed-by,component} on all four objects."""
        expected = {
            "app.kubernetes.io/name": "smtprelay",
            "app.kubernetes.io/instance": "mail",
            "app.kubernetes.io/managed-by": "smtprelay-operator",
            "app.kubernetes.io/component": "relay",
        }
        for obj in make().objects():
            assert obj["metadata"]["labels"] == expected
            assert obj["metadata"]["namespace"] == "team-a"

    def test_selector_matches_the_pod_labels(self) -> None:
        """Deployment and Service select exactly the relay's pods."""
        rendered = make()
        pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
        for selector in (
            rendered.deployment["spec"]["selector"]["matchLabels"],
            rendered.service["spec"]["selector"],
        ):
            assert selector.items() <= pod_labels.items()


class TestService:
    def test_cluster_ip_port_25_to_smtp(self) -> None:
        """Port 25 → the named smtp port (2525); no traffic policy on ClusterIP."""
        service = make().service["spec"]
        assert service["type"] == "ClusterIP"
        assert service["ports"] == [
            {"name": "smtp", "protocol": "TCP", "port": 25, "targetPort": "smtp"}
        ]
        assert "externalTrafficPolicy" not in service

    @pytest.mark.parametrize("kind", ["LoadBalancer", "NodePort"])
    def test_external_services_keep_client_addresses(self, kind: str) -> None:
        """LoadBalancer and NodePort get externalTrafficPolicy Local (allowedNetworks is real)."""
        service = make({"service": {"type": kind, "port": 2525}}).service["spec"]
        assert service["externalTrafficPolicy"] == "Local"
        assert service["ports"][0]["port"] == 2525


class TestMonitoring:
    def test_nothing_unless_asked(self) -> None:
        """No spec.monitoring: no PodMonitor, no PrometheusRule."""
        assert make({}).monitoring == ()

    def test_pod_monitor_scrapes_the_relay_pods_metrics_port(self) -> None:
        """podMonitor: true → a PodMonitor selecting this relay's pods, port metrics."""
        rendered = make({"monitoring": {"podMonitor": True, "labels": {"release": "prom"}}})
        [monitor] = rendered.monitoring
        assert monitor["kind"] == "PodMonitor"
        assert monitor["spec"]["selector"]["matchLabels"] == render.selector("mail")
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert monitor["metadata"]["ownerReferences"][0]["kind"] == "SmtpRelay"
        pod_ports = pod_spec(rendered)["containers"][0]["ports"]
        assert "metrics" in [port["name"] for port in pod_ports]

    def test_rules_alert_on_what_the_owner_must_know(self) -> None:
        """prometheusRule: true → relay down, mail waiting, deliveries failing, config
        refused; each selects this relay's series by the PodMonitor's job."""
        [rule] = make({"monitoring": {"prometheusRule": True}}).monitoring
        rules = rule["spec"]["groups"][0]["rules"]
        assert [r["alert"] for r in rules] == [
            "SmtpRelayDown",
            "SmtpRelayMailWaiting",
            "SmtpRelayDeliveriesFailing",
            "SmtpRelayConfigRefused",
        ]
        for item in rules:
            assert 'namespace="team-a", job="team-a/mail"' in item["expr"]
            assert item["labels"]["smtprelay"] == "mail"

    def test_the_deployment_follows_what_the_pod_mounts_and_nothing_else(self) -> None:
        """ConfigMap and PVC before the Deployment; the Services after it, so a new relay's
        pod is asked for two requests sooner."""
        kinds = [obj["kind"] for obj in make().objects()]
        assert kinds == [
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "Service",
        ]

    def test_a_first_apply_sends_the_pod_objects_side_by_side(self) -> None:
        """Nothing applied before: ConfigMap, PVC and Deployment in one stage. After that,
        the Deployment waits for its ConfigMap (a pod never rolls onto a missing relay.yaml)."""
        rendered = make()
        [first] = rendered.pod_stages(first=True)
        assert [obj["kind"] for obj in first] == [
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
        ]
        stages = rendered.pod_stages()
        assert [[obj["kind"] for obj in stage] for stage in stages] == [
            ["ConfigMap", "PersistentVolumeClaim"],
            ["Deployment"],
        ]

    def test_monitoring_is_applied_after_the_deployment(self) -> None:
        """A cluster without prometheus-operator's CRDs holds back nothing else."""
        rendered = make({"monitoring": {"podMonitor": True, "prometheusRule": True}})
        kinds = [obj["kind"] for obj in rendered.objects()]
        assert kinds.index("Deployment") < kinds.index("PodMonitor")

    def test_metrics_service_is_headless_and_internal(self) -> None:
        """<name>-metrics: headless, port 9090, not-ready pods listed, never a LoadBalancer."""
        service = make({"service": {"type": "LoadBalancer"}}).metrics_service
        assert service["metadata"]["name"] == "mail-metrics"
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["ports"] == [
            {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": "metrics"}
        ]
