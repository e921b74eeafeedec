"""The chart's crds/ is the generated CRD, byte for byte the one at the top level."""

from __future__ import annotations

import helm_python as helm
from smtprelay_operator import crd

from tests.chart import chart

TOP_LEVEL = chart.ROOT / "crds"
IN_CHART = chart.CHART_DIR / "crds"


class TestCrdCopy:
    def test_chart_crds_equal_top_level_crds(self) -> None:
        """Same files, same bytes: `helm install` and `kubectl apply -f crds/` agree."""
        top = {path.name: path.read_bytes() for path in TOP_LEVEL.glob("*.yaml")}
        ours = {path.name: path.read_bytes() for path in IN_CHART.glob("*.yaml")}
        assert top, "crds/ is empty"
        assert sorted(ours) == sorted(top), "the chart's crds/ holds other files than crds/"
        for name, text in top.items():
            assert ours[name] == text, (
                f"charts/smtprelay-operator/crds/{name} differs from crds/{name}: "
                "regenerate with `python -m smtprelay_operator.crd` and copy it"
            )

    def test_chart_crd_is_the_generated_one(self) -> None:
        """The copy is what the operator's model generates today."""
        assert (IN_CHART / crd.FILE_NAME).read_text() == crd.render_yaml()

    def test_helm_installs_the_crd(self) -> None:
        """Helm sees the CRD in crds/, so it is installed before the templates."""
        with helm.Chart.load(chart.CHART_DIR) as loaded:
            names = [item["name"] for item in loaded.crds]
        assert names == [f"crds/{crd.FILE_NAME}"]
