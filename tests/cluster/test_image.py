"""The relay image: built from the project's Dockerfile, cached by what goes into it."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from devcluster import cache, image


def _blob(archive: tarfile.TarFile, digest: str) -> Any:
    member = archive.extractfile(f"blobs/{digest.replace(':', '/')}")
    assert member is not None
    return json.loads(member.read())


class TestSourceHash:
    @pytest.fixture
    def tree(self, tmp_path: Path) -> Path:
        for name in image.IMAGE_SOURCES:
            source = image.ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(source, tmp_path / name)
        return tmp_path

    def test_an_edit_to_the_relay_changes_the_key(self, tree: Path) -> None:
        """Any byte the Dockerfile copies is in the key, so an edit rebuilds the image."""
        before = cache.tree_hash(tree, image.IMAGE_SOURCES)
        module = tree / "relay" / "smtprelay" / "config.py"
        module.write_text(module.read_text() + "\n# edited\n")
        assert cache.tree_hash(tree, image.IMAGE_SOURCES) != before

    def test_bytecode_and_egg_info_do_not_change_the_key(self, tree: Path) -> None:
        """Running the code locally must not invalidate the cached image."""
        before = cache.tree_hash(tree, image.IMAGE_SOURCES)
        (tree / "relay" / "smtprelay" / "__pycache__").mkdir()
        (tree / "relay" / "smtprelay" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"x")
        (tree / "relay" / "smtprelay.egg-info").mkdir()
        (tree / "relay" / "smtprelay.egg-info" / "PKG-INFO").write_text("x")
        assert cache.tree_hash(tree, image.IMAGE_SOURCES) == before


class TestBuiltImage:
    @pytest.mark.timeout(1200)  # a cold build (mmdebstrap + podman) takes minutes
    def test_archive_holds_the_chart_default_image_running_as_10001(self) -> None:
        """The OCI archive names the chart's default image; its config is the Dockerfile's."""
        built = image.ensure_image()
        assert built.key == image.source_key()
        assert built.name == f"ghcr.io/smtprelay/smtprelay:{image.version()}"
        with tarfile.open(built.archive) as archive:
            index = json.loads(archive.extractfile("index.json").read())  # type: ignore[union-attr]
            [entry] = index["manifests"]
            assert entry["annotations"]["org.opencontainers.image.ref.name"] == built.name
            manifest = _blob(archive, entry["digest"])
            config = _blob(archive, manifest["config"]["digest"])["config"]
        assert config["User"] == "10001:10001"
        assert config["Cmd"] == ["smtprelay", "serve", "--config", "/etc/smtprelay/relay.yaml"]
        assert "/opt/venv/bin" in next(v for v in config["Env"] if v.startswith("PATH="))
        assert {"2525/tcp", "9090/tcp"} <= set(config["ExposedPorts"])
