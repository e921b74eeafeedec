"""Another revision of the relay beside the working tree's, for before/after in one run.

``--baseline REV`` (a commit, tag or branch) exports that revision's ``relay/`` directory with
``git archive`` into the scratch directory; the relay started from it runs with that
directory first on ``PYTHONPATH``, under the same interpreter and installed libraries. So a
run measures the old and the new relay and Postfix interleaved, under the same load.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def export(revision: str, into: Path) -> Path:
    """``relay/`` of ``revision`` under ``into``; returns the directory to put on the path."""
    archive = subprocess.run(
        ["git", "-C", str(_REPO), "archive", "--format=tar", revision, "relay"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # extractall(filter="data") needs Python 3.11.4; Debian 12 has 3.11.2. The archive
        # is our own repository's, of plain files and directories: anything else is refused.
        members = tar.getmembers()
        for member in members:
            name = Path(member.name)
            if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
                raise ValueError(f"unexpected entry in git archive of {revision}: {member.name}")
        tar.extractall(into, members=members)  # noqa: S202 -- every member checked above
    return into / "relay"


def short(revision: str) -> str:
    return subprocess.run(
        ["git", "-C", str(_REPO), "rev-parse", "--short", revision],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
