"""The shipped examples against the real API server (kwok control plane, no node needed).

The main job itself, manifest to delivered mail through pods a kubelet runs, is
test_real_node.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.operator.support import Cluster

ROOT = Path(__file__).resolve().parents[2]


class TestExamples:
    def test_every_example_is_accepted_by_the_api_server(self, cluster: Cluster) -> None:
        """examples/*.yaml pass the CRD's schema and CEL rules (server-side dry run)."""
        for path in sorted((ROOT / "examples").glob("*.yaml")):
            result = subprocess.run(
                [
                    str(cluster.plane.bin_dir / "kubectl"),
                    "apply",
                    "--dry-run=server",
                    "-n",
                    cluster.namespace,
                    "-f",
                    str(path),
                ],
                env=cluster.plane.env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            assert "created (server dry run)" in result.stdout, result.stdout
