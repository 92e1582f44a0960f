"""The Grafana dashboard: generated from one builder, every query reads what the enricher exposes.

(The live half, every query returning data from a real Prometheus scraping a real enricher, is in
test_deploy_prometheus.py.)
"""

from __future__ import annotations

import json
import re

from deploy.grafana.build_dashboard import render
from tests.integration import deploy_files as df

VARIABLES = {"$__rate_interval", "$__range", "$namespace"}


def _board() -> dict[str, object]:
    board: dict[str, object] = json.loads(df.DASHBOARD.read_text())
    return board


def test_committed_json_is_the_builders_output() -> None:
    assert df.DASHBOARD.read_text() == render(), "run: python deploy/grafana/build_dashboard.py"


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    titles = " | ".join(t for t, _ in df.dashboard_targets()).lower()
    for needle in (
        "by namespace",
        "by workload",
        "zone-to-zone",
        "top talkers",
        "cost per day",
        "cost per month",
        "agent",
        "enricher",
        "metadata synced",
        "export failures",
        "savings available",
        "recommendations",
        "by service",
        "service routing",
    ):
        assert needle in titles, needle


def test_every_query_reads_known_metrics_and_labels() -> None:
    targets = df.dashboard_targets()
    assert len(targets) >= 20
    for title, target in targets:
        expr = target["expr"]
        if expr.startswith("label_values("):
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr).groups()  # type: ignore[union-attr]
            assert metric in df.known_metrics() and label in df.known_labels(), title
            continue
        assert df.promql_metrics(expr) and df.promql_metrics(expr) <= df.known_metrics(), (title, expr)
        assert df.promql_labels(expr) <= df.known_labels(), (title, expr)
        assert set(re.findall(r"\$\w+", expr)) <= VARIABLES, (title, expr)


def test_legends_name_labels_the_query_keeps() -> None:
    for title, target in df.dashboard_targets():
        legend_labels = set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
        if " by (" not in target["expr"]:
            continue  # no aggregation: every label of the series is kept
        assert legend_labels <= df.promql_labels(target["expr"]), title


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _board()["panels"]
    assert isinstance(panels, list)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def test_every_query_uses_the_datasource_variable() -> None:
    for panel in _board()["panels"]:  # type: ignore[attr-defined]
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
