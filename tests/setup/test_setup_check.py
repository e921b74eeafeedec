"""`scripts/setup.sh --check`: every capability the tests use is there, or the package is named.

Issue 11: swaks was installed without the Perl TLS modules it only recommends, so
`swaks --tls` failed on a new machine while CI passed on one that had them from earlier work.
The check is on the capability (what `swaks --support` reports), not the package name.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def _check(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP), "--check"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


class TestSetupCheck:
    def test_this_machine_has_every_capability(self) -> None:
        """After setup ran, --check finds nothing missing (swaks --tls included)."""
        result = _check()
        assert result.returncode == 0, result.stdout + result.stderr
        assert "swaks --tls" in result.stdout
        assert "MISSING" not in result.stdout

    def test_swaks_without_tls_names_the_packages(self, tmp_path: Path) -> None:
        """A swaks that cannot do TLS is reported with the Debian packages that fix it."""
        # A stand-in swaks: the real one's --support output on a machine without Net::SSLeay.
        # The real package cannot be removed here without breaking the other tests.
        fake = tmp_path / "swaks"
        fake.write_text(
            "#!/bin/sh\n"
            "echo '=== Basic AUTH supported'\n"
            "echo '*** TLS not available: requires Net::SSLeay'\n"
        )
        fake.chmod(0o755)
        env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
        result = _check(env)
        assert result.returncode == 1
        line = next(x for x in result.stdout.splitlines() if "swaks --tls" in x)
        assert line.startswith("MISSING")
        assert "libnet-ssleay-perl" in line
        assert "libio-socket-ssl-perl" in line
