"""The committed Grafana dashboard (deploy/grafana/antiphon-dashboard.json) against the metrics
the code defines (`antiphon.metrics.METRICS`): a panel for each, and no panel for one that is
not there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from antiphon.metrics import METRICS

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "antiphon-dashboard.json"
SERIES = {series: spec.name for spec in METRICS for series in spec.series}
_NAMED = re.compile(r"\bray_[a-zA-Z0-9_:]+")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graphs(dashboard: dict) -> list[dict]:
    """The panels that query (rows hold none), those inside collapsed rows included."""
    panels = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in graphs(dashboard) for target in panel["targets"]]


def test_it_is_a_dashboard_model_on_a_prometheus_datasource_variable(dashboard):
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    source = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    nested = [child for panel in dashboard["panels"] for child in panel.get("panels", [])]
    ids = [panel["id"] for panel in [*dashboard["panels"], *nested]]
    assert len(set(ids)) == len(ids)
    for panel in graphs(dashboard):
        assert panel["title"] and panel["type"] == "timeseries", panel
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source and target["expr"], panel["title"]


def test_every_defined_metric_has_a_panel(dashboard):
    shown = {SERIES[name] for expr in exprs(dashboard) for name in _NAMED.findall(expr)
             if name in SERIES}  # fmt: skip
    assert shown == {spec.name for spec in METRICS}


def test_every_query_names_defined_metrics_only(dashboard):
    for expr in exprs(dashboard):
        named = _NAMED.findall(expr)
        assert named, expr
        unknown = [name for name in named if name not in SERIES]
        assert not unknown, f"{expr}: no metric defines {unknown}"
