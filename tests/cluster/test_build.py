"""The build derives its pins from the Kubernetes release rather than from a typed list."""

from __future__ import annotations

import json
from pathlib import Path

from devcluster import build

_GO_MOD = """\
module k8s.io/kubernetes

require (
\tgo.etcd.io/etcd/server/v3 v3.6.8 // indirect
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
\tk8s.io/klog/v2 v2.140.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/sample-cli-plugin => ./staging/src/k8s.io/sample-cli-plugin
)
"""


class TestParsePins:
    def test_staging_modules_are_required_and_replaced(self) -> None:
        """Only modules both required at v0.0.0 and replaced into staging/ are pinned."""
        pins = build.parse_pins(_GO_MOD)
        assert pins.staging == ("k8s.io/api", "k8s.io/client-go")

    def test_etcd_version_comes_from_the_release(self) -> None:
        """etcd is built at the version the Kubernetes release requires."""
        assert build.parse_pins(_GO_MOD).etcd_version == "v3.6.8"

    def test_commit_comes_from_module_origin(self) -> None:
        """The proxy's Origin hash becomes the binaries' gitCommit."""
        info = json.dumps({"Origin": {"Hash": "abc123"}})
        assert build.parse_pins(_GO_MOD, info).commit == "abc123"


class TestGoMod:
    def test_staging_modules_replaced_by_matching_tag(self) -> None:
        """k8s.io/api is replaced by its v0.X.Y tag for the pinned v1.X.Y release."""
        go_mod = build.kube_go_mod(build.parse_pins(_GO_MOD))
        tag = build.staging_version(build.KUBERNETES_VERSION)
        assert f"\tk8s.io/api => k8s.io/api {tag}\n" in go_mod
        assert f"require k8s.io/kubernetes {build.KUBERNETES_VERSION}\n" in go_mod

    def test_staging_version_maps_minor_and_patch(self) -> None:
        """v1.36.3 maps to v0.36.3."""
        assert build.staging_version("v1.36.3") == "v0.36.3"

    def test_ldflags_stamp_both_version_packages(self) -> None:
        """component-base and client-go both learn the pinned gitVersion."""
        flags = build.kube_ldflags("abc")
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            assert f"-X {package}.gitVersion={build.KUBERNETES_VERSION}" in flags


class TestCompleteness:
    def test_stamp_alone_is_not_complete(self, tmp_path: Path) -> None:
        """A stamp without every binary means a half-finished cache: build again."""
        (tmp_path / ".complete").write_text("{}")
        assert not build.is_complete(tmp_path)

    def test_stamp_and_every_file_is_complete(self, tmp_path: Path) -> None:
        """With the stamp and all binaries present, the build is skipped."""
        for name in (*build.BINARIES, build.KWOK_STAGES, ".complete"):
            (tmp_path / name).write_text("")
        assert build.is_complete(tmp_path)
