"""What the chart renders with default, namespaced and fully customised values."""

from __future__ import annotations

import json
from typing import Any

import pytest
from smtprelay_operator import main, render

from tests.chart import chart

RELEASE_LABELS = {
    "app.kubernetes.io/name": "smtprelay-operator",
    "app.kubernetes.io/instance": chart.RELEASE,
    "app.kubernetes.io/managed-by": "Helm",
}


def _pod_spec(objects: list[chart.Object]) -> dict[str, Any]:
    spec: dict[str, Any] = chart.only(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


class TestDefaults:
    def test_objects(self) -> None:
        """A ServiceAccount, ClusterRole, ClusterRoleBinding and Deployment; nothing else."""
        objects = chart.render()
        assert sorted(chart.kinds(objects)) == [
            ("ClusterRole", "smtprelay-operator", None),
            ("ClusterRoleBinding", "smtprelay-operator", None),
            ("Deployment", "smtprelay-operator", chart.NAMESPACE),
            ("ServiceAccount", "smtprelay-operator", chart.NAMESPACE),
        ]
        for obj in objects:
            assert RELEASE_LABELS.items() <= obj["metadata"]["labels"].items()

    def test_release_name_without_the_chart_name_is_prefixed(self) -> None:
        """Release `mail` names its objects `mail-smtprelay-operator`."""
        objects = chart.render(release="mail")
        assert {name for _, name, _ in chart.kinds(objects)} == {"mail-smtprelay-operator"}

    def test_one_operator_at_a_time(self) -> None:
        """One replica, and Recreate, so an upgrade never runs two operators at once."""
        spec = chart.only(chart.render(), "Deployment")["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}

    def test_security_context(self) -> None:
        """Non-root, read-only root filesystem, no capabilities, seccomp RuntimeDefault."""
        objects = chart.render()
        pod = _pod_spec(objects)["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        container = chart.container(objects)["securityContext"]
        assert container == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        }

    def test_runs_as_the_images_user(self) -> None:
        """UID/GID 10001: the Dockerfile's USER, and the UID the operator gives relay pods."""
        pod = _pod_spec(chart.render())["securityContext"]
        dockerfile = (chart.ROOT / "Dockerfile").read_text()
        users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
        assert users == [f"{render.RUN_AS}:{render.RUN_AS}"]
        assert pod["runAsUser"] == pod["runAsGroup"] == render.RUN_AS == 10001

    def test_container_runs_the_operator_cluster_wide(self) -> None:
        """`smtprelay-operator` with kopf's liveness endpoint, JSON logs, its own metrics on
        8090 and no --namespace."""
        container = chart.container(chart.render())
        assert container["command"] == ["smtprelay-operator"]
        assert container["args"] == [
            "--liveness=http://0.0.0.0:8080/healthz",
            "--log-format=json",
            "--metrics-listen=0.0.0.0:8090",
        ]
        assert {"name": "metrics", "containerPort": 8090, "protocol": "TCP"} in container["ports"]
        assert container["image"] == "ghcr.io/smtprelay/smtprelay:0.1.0"
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]

    def test_liveness_probe_hits_kopfs_endpoint(self) -> None:
        """The kubelet probes http :8080/healthz, the port kopf listens on."""
        container = chart.container(chart.render())
        probe = container["livenessProbe"]["httpGet"]
        assert probe["path"] == "/healthz"
        port = next(port for port in container["ports"] if port["name"] == probe["port"])
        assert port["containerPort"] == 8080

    def test_relay_image_follows_the_app_version(self) -> None:
        """The relay pods get the image of the same release, through $SMTPRELAY_RELAY_IMAGE."""
        env = chart.env(chart.render())
        assert env["SMTPRELAY_RELAY_IMAGE"] == "ghcr.io/smtprelay/smtprelay:0.1.0"
        assert "SMTPRELAY_ALLOWED_IMAGES" not in env, "the default: the relay repository"

    def test_allowed_images_reach_the_operator(self) -> None:
        """relayImage.allowed becomes $SMTPRELAY_ALLOWED_IMAGES, the spec.image allow-list."""
        values = {"relayImage": {"repository": "r/relay", "allowed": ["r/relay:*", "m/relay@*"]}}
        assert chart.env(chart.render(values))["SMTPRELAY_ALLOWED_IMAGES"] == "r/relay:*,m/relay@*"

    def test_chart_version_is_the_package_version(self) -> None:
        """Chart version and appVersion are the `smtprelay` version in pyproject.toml."""
        import tomllib

        import yaml

        project = tomllib.loads((chart.ROOT / "pyproject.toml").read_text())["project"]
        metadata = yaml.safe_load((chart.CHART_DIR / "Chart.yaml").read_text())
        assert metadata["apiVersion"] == "v2"
        assert metadata["version"] == metadata["appVersion"] == project["version"]

    def test_notes_say_what_to_apply_next(self) -> None:
        """NOTES.txt shows an SmtpRelay to apply and the kubectl wait for its Ready condition."""
        notes = chart.notes()
        assert "kind: SmtpRelay" in notes
        assert "kubectl wait -n default --for=condition=Ready smtprelay/mail" in notes


class TestDashboard:
    def test_enabled_ships_the_dashboard_for_grafanas_sidecar(self) -> None:
        """dashboards.enabled: a ConfigMap with the sidecar's label holding the dashboard file."""
        objects = chart.render({"dashboards": {"enabled": True}})
        dashboard = chart.only(objects, "ConfigMap", "smtprelay-operator-dashboard")
        assert dashboard["metadata"]["namespace"] == chart.NAMESPACE
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert RELEASE_LABELS.items() <= dashboard["metadata"]["labels"].items()
        assert "annotations" not in dashboard["metadata"]
        assert list(dashboard["data"]) == ["smtprelay.json"]
        shipped = (chart.CHART_DIR / "dashboards" / "smtprelay.json").read_text()
        assert dashboard["data"]["smtprelay.json"] == shipped.rstrip("\n")
        assert json.loads(dashboard["data"]["smtprelay.json"]) == json.loads(shipped)

    def test_sidecar_label_can_be_replaced(self) -> None:
        """A sidecar configured with another label gets that label; Helm merges value maps,
        so the default one goes only when set to null."""
        labels = {"dashboards": "grafana", "grafana_dashboard": None}
        values = {"dashboards": {"enabled": True, "labels": labels}}
        labels = chart.only(chart.render(values), "ConfigMap")["metadata"]["labels"]
        assert labels["dashboards"] == "grafana"
        assert "grafana_dashboard" not in labels

    def test_disabled_by_default(self) -> None:
        """No ConfigMap unless asked for: not every cluster runs Grafana's sidecar."""
        assert not [obj for obj in chart.render() if obj["kind"] == "ConfigMap"]


class TestNamespaced:
    VALUES: dict[str, Any] = {  # noqa: RUF012 - read-only test data
        "rbac": {"scope": "namespaced"},
        "watchNamespaces": ["team-a", "team-b"],
    }

    def test_roles_per_namespace_and_nothing_cluster_scoped(self) -> None:
        """A Role and RoleBinding in each watched namespace; no ClusterRole(Binding)."""
        objects = chart.render(self.VALUES)
        assert sorted(chart.kinds(objects)) == [
            ("Deployment", "smtprelay-operator", chart.NAMESPACE),
            ("Role", "smtprelay-operator", "team-a"),
            ("Role", "smtprelay-operator", "team-b"),
            ("RoleBinding", "smtprelay-operator", "team-a"),
            ("RoleBinding", "smtprelay-operator", "team-b"),
            ("ServiceAccount", "smtprelay-operator", chart.NAMESPACE),
        ]
        for obj in objects:
            if obj["kind"] == "RoleBinding":
                assert obj["roleRef"] == {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "smtprelay-operator",
                }
                assert obj["subjects"] == [
                    {
                        "kind": "ServiceAccount",
                        "name": "smtprelay-operator",
                        "namespace": chart.NAMESPACE,
                    }
                ]

    def test_operator_watches_only_those_namespaces(self) -> None:
        """The operator is started with one --namespace per watched namespace."""
        args = chart.container(chart.render(self.VALUES))["args"]
        assert args[:2] == ["--namespace=team-a", "--namespace=team-b"]

    def test_notes_use_a_watched_namespace(self) -> None:
        """The example in NOTES.txt lands where the operator is looking."""
        assert "kubectl apply -n team-a" in chart.notes(self.VALUES)

    def test_cluster_scope_can_be_limited_too(self) -> None:
        """Cluster scope with watchNamespaces: a ClusterRole, and the operator limited."""
        objects = chart.render({"watchNamespaces": ["team-a"]})
        chart.only(objects, "ClusterRole")
        assert chart.container(objects)["args"][0] == "--namespace=team-a"


class TestCustomised:
    def test_objects_and_names(self) -> None:
        """fullnameOverride names everything; the relays and per-namespace Roles appear."""
        objects = chart.render(chart.custom_values())
        assert sorted(chart.kinds(objects)) == [
            ("ConfigMap", "mail-operator-dashboard", chart.NAMESPACE),
            ("Deployment", "mail-operator", chart.NAMESPACE),
            ("Role", "mail-operator", "mail"),
            ("Role", "mail-operator", "mail-staging"),
            ("RoleBinding", "mail-operator", "mail"),
            ("RoleBinding", "mail-operator", "mail-staging"),
            ("ServiceAccount", "mail-operator-sa", chart.NAMESPACE),
            ("SmtpRelay", "outbound", "mail"),
        ]

    def test_pod_settings(self) -> None:
        """Images, pull secrets, scheduling, labels and annotations reach the pod."""
        values = chart.custom_values()
        objects = chart.render(values)
        deployment = chart.only(objects, "Deployment")
        template = deployment["spec"]["template"]
        pod = template["spec"]
        container = chart.container(objects)
        assert container["image"] == "registry.example.com/mirror/smtprelay:0.1.0-rc.1"
        assert container["imagePullPolicy"] == "Always"
        assert container["resources"] == values["resources"]
        assert pod["serviceAccountName"] == "mail-operator-sa"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == values["nodeSelector"]
        assert pod["tolerations"] == values["tolerations"]
        assert pod["affinity"] == values["affinity"]
        assert pod["priorityClassName"] == "system-cluster-critical"
        assert template["metadata"]["annotations"] == values["podAnnotations"]
        assert template["metadata"]["labels"]["tier"] == "control"
        assert template["metadata"]["labels"]["team"] == "platform"
        assert deployment["metadata"]["annotations"] == values["commonAnnotations"]
        for obj in objects:
            assert obj["metadata"]["labels"]["team"] == "platform"

    def test_operator_args_and_env(self) -> None:
        """--namespace per watched namespace, the custom liveness port and log format, --debug,
        relay digest."""
        objects = chart.render(chart.custom_values())
        container = chart.container(objects)
        assert container["args"] == [
            "--namespace=mail",
            "--namespace=mail-staging",
            "--liveness=http://0.0.0.0:8081/healthz",
            "--log-format=full",
            "--metrics-listen=0.0.0.0:8090",
            "--debug",
        ]
        assert container["ports"][0]["containerPort"] == 8081
        assert chart.env(objects)["SMTPRELAY_RELAY_IMAGE"] == (
            "registry.example.com/mirror/smtprelay-relay@sha256:"
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        )

    def test_service_account_annotations(self) -> None:
        """serviceAccount.annotations (workload identity) land on the ServiceAccount."""
        account = chart.only(chart.render(chart.custom_values()), "ServiceAccount")
        assert account["metadata"]["annotations"]["iam.example.com/role"] == "mail-operator"

    def test_relays_render_as_smtprelays(self) -> None:
        """relays: items become SmtpRelay objects with their spec untouched."""
        values = chart.custom_values()
        relay = chart.only(chart.render(values), "SmtpRelay")
        assert relay["apiVersion"] == "smtprelay.dev/v1alpha1"
        assert relay["spec"] == values["relays"][0]["spec"]
        assert relay["metadata"]["labels"]["tier"] == "mail"
        assert relay["metadata"]["annotations"]["note"] == "declared by the Helm release"

    def test_verbose_log_level(self) -> None:
        """logLevel=verbose starts the operator with --verbose."""
        assert chart.container(chart.render({"logLevel": "verbose"}))["args"][-1] == "--verbose"

    def test_dashboard_labels_and_annotations(self) -> None:
        """dashboards.labels/annotations join the common ones on the dashboard ConfigMap."""
        dashboard = chart.only(chart.render(chart.custom_values()), "ConfigMap")["metadata"]
        assert dashboard["labels"]["grafana_dashboard"] == "mail"
        assert dashboard["labels"]["team"] == "platform"
        assert dashboard["annotations"] == {
            "grafana_folder": "Mail",
            "owner": "platform@example.com",
        }

    @pytest.mark.parametrize("log_format", ["plain", "full", "json"])
    def test_log_format(self, log_format: str) -> None:
        """logFormat is passed to the operator as --log-format, and the operator takes it."""
        args = chart.container(chart.render({"logFormat": log_format}))["args"]
        assert f"--log-format={log_format}" in args
        assert main.parse_args(args).log_format == log_format

    def test_without_rbac_and_account(self) -> None:
        """rbac.create=false and an existing account: only the Deployment, using that account."""
        objects = chart.render(
            {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops-sa"}}
        )
        assert [kind for kind, _, _ in chart.kinds(objects)] == ["Deployment"]
        assert _pod_spec(objects)["serviceAccountName"] == "ops-sa"
