"""Build the relay's image here, without Docker or a registry, and cache it as an OCI archive.

A Debian base comes from mmdebstrap and the Debian mirror; the project's own Dockerfile is
built on it by podman with only its `BASE` build argument swapped; the result is saved as
an OCI archive that containerd imports (`ctr images import`). Both steps are cached under
`~/.cache/smtprelay/image`: the base by its recipe, the image by a hash of every file the
Dockerfile copies, so an edit to the relay or operator rebuilds the image and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
from pathlib import Path

from devcluster.cache import BuildError, cache_root, locked, run, say, tree_hash

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# The python image's `pip` is that Python's; here a venv on PATH plays that part.
BASE_VENV = "/opt/venv"
BASE_PATH = f"{BASE_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Everything the Dockerfile reads (COPY) and what decides how it is read. README.md is
# copied too, but only as the wheel's long description: a docs edit need not rebuild.
IMAGE_SOURCES = ("Dockerfile", ".dockerignore", "pyproject.toml", "relay", "operator")
REPOSITORY = "ghcr.io/smtprelay/smtprelay"
_COMPONENT = "image"
# The package proxy's TLS is re-signed by a CA only the host trusts: RUN steps borrow the
# host's bundle and pip configuration read-only, so nothing of them ends up in the image.
_LENT_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf")


@dataclasses.dataclass(frozen=True)
class Image:
    """A built image: the OCI archive containerd imports and the name the chart uses."""

    archive: Path
    name: str
    key: str


def image_dir() -> Path:
    return cache_root() / "image"


def version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return str(project["version"])


def image_name() -> str:
    """The chart's default (`image.repository`:appVersion), so `helm install` needs no flags."""
    return f"{REPOSITORY}:{version()}"


def _mirror() -> str:
    return os.environ.get("SMTPRELAY_DEBIAN_MIRROR", DEBIAN_MIRROR)


def _base_recipe() -> list[str]:
    """mmdebstrap's arguments after the output path; also the base's cache key."""
    mirror = _mirror()
    security = os.environ.get("SMTPRELAY_DEBIAN_SECURITY_MIRROR", DEBIAN_SECURITY_MIRROR)
    return [
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        f'--customize-hook=chroot "$1" python3 -m venv {BASE_VENV}',
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
        DEBIAN_SUITE,
        "-",  # where the tarball goes (replaced by its path); the sources follow
        f"deb {mirror} {DEBIAN_SUITE} main",
        f"deb {mirror} {DEBIAN_SUITE}-updates main",
        f"deb {security} {DEBIAN_SUITE}-security main",
    ]


def base_key() -> str:
    return tree_hash(ROOT, [], extra="\n".join(_base_recipe()))


def source_key() -> str:
    return tree_hash(ROOT, IMAGE_SOURCES, extra=base_key())


def podman() -> list[str]:
    """podman as it works on these machines: runc (crun refuses hybrid cgroups), cgroupfs,
    file events, and its own storage under the cache so the host's is never touched."""
    runc = shutil.which("runc") or "/usr/sbin/runc"
    executable = shutil.which("podman")
    if executable is None or not Path(runc).exists():
        raise BuildError("podman and runc are needed to build the image; run scripts/setup.sh")
    storage = image_dir() / "podman"
    return [
        executable,
        f"--root={storage / 'root'}",
        f"--runroot={storage / 'run'}",
        f"--runtime={runc}",
        "--cgroup-manager=cgroupfs",
        "--events-backend=file",
    ]


def _ensure_base() -> str:
    """The mmdebstrap base, imported into podman's storage; returns its reference."""
    key = base_key()
    reference = f"localhost/smtprelay-base:{key}"
    exists = run(
        [*podman(), "images", "--quiet", reference],
        component=_COMPONENT,
        what="look for the base",
        heartbeat=60,
    )
    if exists.strip():
        return reference
    tarball = image_dir() / f"base-{key}.tar"
    if not tarball.is_file():
        mmdebstrap = shutil.which("mmdebstrap")
        if mmdebstrap is None:
            raise BuildError("mmdebstrap is needed to build the base; run scripts/setup.sh")
        say(_COMPONENT, f"Debian {DEBIAN_SUITE} base with mmdebstrap from {_mirror()} (~75 s)")
        recipe = _base_recipe()
        partial = tarball.with_suffix(".partial")
        at = recipe.index("-")
        run(
            [mmdebstrap, "--format=tar", *recipe[:at], str(partial), *recipe[at + 1 :]],
            component=_COMPONENT,
            what="mmdebstrap",
        )
        partial.rename(tarball)
    run(
        [
            *podman(),
            "import",
            f"--change=ENV PATH={BASE_PATH}",
            '--change=CMD ["python3"]',
            str(tarball),
            reference,
        ],
        component=_COMPONENT,
        what="podman import base",
    )
    return reference


def _build(key: str, archive: Path) -> None:
    base = _ensure_base()
    say(_COMPONENT, f"podman build of Dockerfile on {base} (~30 s)")
    lent = [f"--volume={path}:{path}:ro" for path in _LENT_FILES if Path(path).is_file()]
    local = f"localhost/smtprelay:{key}"
    run(
        [
            *podman(),
            "build",
            f"--build-arg=BASE={base}",
            "--network=host",
            *lent,
            f"--tag={local}",
            f"--tag={image_name()}",
            f"--file={ROOT / 'Dockerfile'}",
            str(ROOT),
        ],
        component=_COMPONENT,
        what="podman build",
    )
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    run(
        [*podman(), "save", "--format=oci-archive", f"--output={partial}", image_name()],
        component=_COMPONENT,
        what="podman save",
    )
    partial.rename(archive)
    _forget_older(keep=local, archive=archive)


def _forget_older(*, keep: str, archive: Path) -> None:
    """Each build is ~400 MB in podman's storage and ~130 MB archived: keep the newest only."""
    for old in image_dir().glob("smtprelay-*.oci.tar"):
        if old != archive:
            old.unlink()
    listed = run(
        [*podman(), "images", "--format={{.Repository}}:{{.Tag}}", "localhost/smtprelay"],
        component=_COMPONENT,
        what="list older builds",
        heartbeat=60,
    )
    older = [name for name in listed.split() if name != keep]
    if older:
        run([*podman(), "rmi", *older], component=_COMPONENT, what="remove older builds")
    run([*podman(), "image", "prune", "--force"], component=_COMPONENT, what="prune layers")


def ensure_image() -> Image:
    """The image for the sources as they are now: built unless the cache holds it."""
    key = source_key()
    archive = image_dir() / f"smtprelay-{key}.oci.tar"
    if not archive.is_file():
        with locked(image_dir()):
            if not archive.is_file():
                _build(key, archive)
    return Image(archive=archive, name=image_name(), key=key)


def main() -> int:
    try:
        image = ensure_image()
    except BuildError as error:
        say(_COMPONENT, f"FAILED: {error}")
        return 1
    say(_COMPONENT, f"{image.name} (sources {image.key})")
    print(image.archive)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
