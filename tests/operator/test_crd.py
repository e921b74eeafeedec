"""crd: the SmtpRelay CRD is generated from the relay's settings model and committed as is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from smtprelay.config import MailSettings, RelayConfig
from smtprelay_operator import crd, render
from smtprelay_operator.schema import format_duration, format_quantity

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = (
    ROOT / "crds" / crd.FILE_NAME,
    ROOT / "charts" / "smtprelay-operator" / "crds" / crd.FILE_NAME,
)
REGENERATE = "python -m smtprelay_operator.crd > crds/smtprelay.dev_smtprelays.yaml"


def schema() -> dict[str, Any]:
    version = crd.custom_resource_definition()["spec"]["versions"][0]
    root: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return root


def spec_schema() -> dict[str, Any]:
    spec: dict[str, Any] = schema()["properties"]["spec"]
    return spec


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """What the API server's defaulting does to ``value`` under ``node``."""
    if value is None and "default" in node:
        value = node["default"]
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for name, child in node["properties"].items():
            filled = apply_defaults(child, value.get(name))
            if filled is not None:
                value[name] = filled
    return value


class TestCommittedCopies:
    def test_crds_directory_matches_the_generator(self) -> None:
        """crds/ holds exactly what the generator writes now."""
        assert COMMITTED[0].read_text() == crd.render_yaml(), f"regenerate: {REGENERATE}"

    def test_chart_copy_matches_the_generator(self) -> None:
        """The chart's crds/ copy is the same file."""
        assert COMMITTED[1].read_text() == crd.render_yaml(), f"regenerate and copy: {REGENERATE}"


class TestNames:
    def test_group_version_kind_and_names(self) -> None:
        """smtprelay.dev/v1alpha1 SmtpRelay, plural smtprelays, short smtpr, with status."""
        spec = crd.custom_resource_definition()["spec"]
        assert spec["group"] == "smtprelay.dev"
        assert spec["names"]["kind"] == "SmtpRelay"
        assert spec["names"]["plural"] == "smtprelays"
        assert spec["names"]["shortNames"] == ["smtpr"]
        assert spec["names"]["categories"] == ["smtprelay"]
        version = spec["versions"][0]
        assert version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}
        columns = [column["name"] for column in version["additionalPrinterColumns"]]
        assert columns == ["Ready", "Gateway", "Tries", "Queue Timer", "Age"]


class TestStructuralSchema:
    def test_no_refs_and_no_unions_but_int_or_string(self) -> None:
        """Only the structural subset: no $ref, anyOf only for int-or-string, every node typed."""
        for path, node in walk(schema()):
            assert "$ref" not in node, path
            assert "title" not in node, path
            if "anyOf" in node:
                assert node.get("x-kubernetes-int-or-string") is True, path
            else:
                assert "type" in node, path
            if "properties" in node:
                assert "additionalProperties" not in node, path

    def test_every_spec_and_status_field_has_a_description(self) -> None:
        """`kubectl explain` has something to say about every field."""
        for part in ("spec", "status"):
            for path, node in walk(schema()["properties"][part], part):
                if not path.endswith(("[]", "{}")):
                    assert node.get("description"), path

    def test_relay_file_only_fields_are_left_out(self) -> None:
        """File paths are the relay's; the CRD has Secret references instead (gateway and
        routes: credentialsSecret, caSecret)."""
        properties = spec_schema()["properties"]
        for fields in (
            properties["gateway"]["properties"],
            properties["routes"]["items"]["properties"],
        ):
            assert "credentialsFile" not in fields
            assert "caFile" not in fields
            assert {"credentialsSecret", "caSecret"} <= set(fields)

    def test_every_mail_setting_is_in_the_spec(self) -> None:
        """The spec carries every field of the relay's MailSettings model."""
        properties = spec_schema()["properties"]
        for name, field in MailSettings.model_fields.items():
            assert (field.alias or name) in properties

    def test_tries_before_gateway_has_no_default(self) -> None:
        """A default would make has() always true and 'requires gateway.host' unsatisfiable."""
        gateway = spec_schema()["properties"]["gateway"]["properties"]
        assert "default" not in gateway["triesBeforeGateway"]

    def test_cross_field_rules_are_cel_with_field_messages(self) -> None:
        """sendAll/triesBeforeGateway need host and tries above; syslog needs a server: CEL."""
        properties = spec_schema()["properties"]
        messages = [rule["message"] for rule in spec_schema()["x-kubernetes-validations"]]
        messages += [r["message"] for r in properties["gateway"]["x-kubernetes-validations"]]
        messages += [r["message"] for r in properties["logging"]["x-kubernetes-validations"]]
        assert messages == [
            "gateway.triesBeforeGateway must be less than delivery.tries",
            "gateway.sendAll requires gateway.host",
            "gateway.triesBeforeGateway requires gateway.host",
            "gateway.host and gateway.hosts are both set; use one of them",
            "gateway.tls none or may would send the credentialsSecret password unverified; "
            "use verify (or encrypt)",
            "logging.target syslog requires logging.syslogServer",
        ]


class TestDefaults:
    def test_defaults_are_written_the_way_users_write_them(self) -> None:
        """30m, 25Mi and 1Gi, not seconds and bytes."""
        properties = spec_schema()["properties"]
        assert properties["delivery"]["properties"]["queueTimer"]["default"] == "30m"
        assert properties["maxMessageSize"]["default"] == "25Mi"
        assert properties["storage"]["properties"]["size"]["default"] == "1Gi"
        assert properties["service"]["properties"]["port"]["default"] == 25

    def test_an_empty_spec_defaulted_by_the_schema_means_the_relays_defaults(self) -> None:
        """The API server's defaults and the relay's own defaults are the same settings."""
        spec = apply_defaults(spec_schema(), None)
        document = render.relay_config(name="mail", namespace="ns", spec=spec)
        defaulted = RelayConfig.model_validate(document)
        relay_defaults = RelayConfig.model_validate({"hostname": "mail.ns.svc"})
        assert defaulted == relay_defaults

    def test_formatters_round_trip(self) -> None:
        """format_duration/format_quantity give the shortest exact spelling."""
        assert format_duration(1800.0) == "30m"
        assert format_duration(90.0) == "90s"
        assert format_duration(7200.0) == "2h"
        assert format_duration(0.25) == "250ms"
        assert format_quantity(26214400) == "25Mi"
        assert format_quantity(1000) == "1000"


class TestGeneratorCommand:
    def test_output_is_one_yaml_document(self, capsys: Any) -> None:
        """`python -m smtprelay_operator.crd` prints the CRD and nothing else."""
        crd.main()
        documents = list(yaml.safe_load_all(capsys.readouterr().out))
        assert len(documents) == 1
        assert documents[0]["kind"] == "CustomResourceDefinition"
