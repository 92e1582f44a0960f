#!/usr/bin/env python3
"""Build deploy/grafana/otel-kzt.json, the Grafana dashboard, from the panel list below.

Usage: python deploy/grafana/build_dashboard.py [--check]
The JSON is generated so that every query is written once, in PromQL that reads like the alert rules; the
test suite checks that the committed JSON equals this output and runs every query against a real Prometheus.
Queries sum over enricher replicas: each replica exposes only the series its own agents wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository's deploy/

from deploy.generated import write_or_check

TARGET = Path(__file__).resolve().parent / "otel-kzt.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Cloud bills count a month as 730 hours.
MONTH_SECONDS = 730 * 3600
DAY_SECONDS = 86400

CROSS = 'kzt_traffic_class="cross-zone"'
BILLED = 'kzt_traffic_class=~"cross-zone|cross-region|external"'
NS = 'source_k8s_namespace_name=~"$namespace"'
SRC_WORKLOAD = "source_k8s_namespace_name, source_k8s_workload_kind, source_k8s_workload_name"
DST_WORKLOAD = "destination_k8s_namespace_name, destination_k8s_workload_kind, destination_k8s_workload_name"
ZONES = "source_cloud_availability_zone, destination_cloud_availability_zone"
AGENT_AGE = "time() - max by (k8s_node_name) (kzt_enricher_agent_last_report_timestamp_seconds)"
HIDE_TIME = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]


def target(expr: str, legend: str = "", *, instant: bool = False, ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "instant": instant,
        "range": not instant,
        "format": "table" if instant else "time_series",
    }


def panel(
    kind: str,
    title: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    unit: str = "short",
    *,
    description: str = "",
    **extra: Any,
) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets,
        **extra,
    }


def series(*queries: tuple[str, str]) -> list[dict[str, Any]]:
    """Range queries drawn together, as (expr, legend); refIds A, B, … in order."""
    return [target(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def table(
    title: str,
    expr: str,
    grid: tuple[int, int, int, int],
    unit: str = "short",
    *,
    description: str = "",
    transformations: list[dict[str, Any]] = HIDE_TIME,
) -> dict[str, Any]:
    """A table: one instant query, a row per series (without the time column unless told otherwise)."""
    return panel(
        "table",
        title,
        [target(expr, instant=True)],
        grid,
        unit,
        description=description,
        transformations=transformations,
    )


def row(title: str, y: int) -> dict[str, Any]:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def traffic_panels(y: int) -> list[dict[str, Any]]:
    by_ns = (
        f"sum by (source_k8s_namespace_name) (rate(kzt_flow_bytes_total{{{CROSS}, {NS}}}[$__rate_interval]))"
    )
    by_wl = f"sum by ({SRC_WORKLOAD}) (rate(kzt_flow_bytes_total{{{CROSS}, {NS}}}[$__rate_interval]))"
    matrix = f"sum by ({ZONES}) (rate(kzt_zone_traffic_bytes_total[$__range]))"
    talkers = (
        f"topk(20, sum by ({SRC_WORKLOAD}, {DST_WORKLOAD}, {ZONES}) "
        f"(rate(kzt_flow_bytes_total{{{BILLED}, {NS}}}[$__range])))"
    )
    pods = (
        "topk(20, sum by (namespace, pod) "
        '(rate(pod_cross_zone_network_traffic_bytes_total{namespace=~"$namespace"}[$__range])))'
    )
    matrix_transform = [
        {
            "id": "groupingToMatrix",
            "options": {
                "rowField": "source_cloud_availability_zone",
                "columnField": "destination_cloud_availability_zone",
                "valueField": "Value",
                "emptyValue": "zero",
            },
        }
    ]
    return [
        row("Cross-zone traffic", y),
        panel(
            "stat",
            "Cross-zone bytes/s",
            [target(f"sum(rate(kzt_flow_bytes_total{{{CROSS}, {NS}}}[$__rate_interval]))")],
            (0, y + 1, 6, 6),
            "Bps",
            description="All cross-zone traffic of the selected namespaces, summed over replicas.",
        ),
        panel(
            "timeseries",
            "Cross-zone bytes/s by namespace",
            [target(by_ns, "{{source_k8s_namespace_name}}")],
            (6, y + 1, 18, 6),
            "Bps",
        ),
        panel(
            "timeseries",
            "Cross-zone bytes/s by workload",
            [
                target(
                    by_wl,
                    "{{source_k8s_namespace_name}}/{{source_k8s_workload_name}} "
                    "({{source_k8s_workload_kind}})",
                )
            ],
            (0, y + 7, 12, 8),
            "Bps",
        ),
        table(
            "Zone-to-zone matrix (bytes/s over the range; rows: source zone)",
            matrix,
            (12, y + 7, 12, 8),
            "Bps",
            description="Every zone pair, same-zone on the diagonal.",
            transformations=matrix_transform,
        ),
        table(
            "Top talkers: workload pairs (billed traffic)",
            talkers,
            (0, y + 15, 16, 9),
            "Bps",
            description="Cross-zone, cross-region and external bytes/s over the range.",
        ),
        table(
            "Top talkers: pods (kubezonnet metric)",
            pods,
            (16, y + 15, 8, 9),
            "Bps",
            description="pod_cross_zone_network_traffic_bytes_total, same name and labels as kubezonnet.",
        ),
    ]


def cost_panels(y: int) -> list[dict[str, Any]]:
    rate_range = f"sum(rate(kzt_estimated_cost_usd_total{{{NS}}}[$__range]))"
    by_class = (
        f"sum by (kzt_traffic_class) (rate(kzt_estimated_cost_usd_total{{{NS}}}[$__rate_interval]))"
        f" * {DAY_SECONDS}"
    )
    by_wl = (
        f"topk(20, sum by ({SRC_WORKLOAD}) (rate(kzt_estimated_cost_usd_total{{{NS}}}[$__range]))"
        f" * {MONTH_SECONDS})"
    )
    return [
        row("Estimated cost", y),
        panel(
            "stat",
            "Estimated cost per day",
            [target(f"{rate_range} * {DAY_SECONDS}", instant=True)],
            (0, y + 1, 6, 6),
            "currencyUSD",
            description="The range's average rate, projected to a day.",
        ),
        panel(
            "stat",
            "Estimated cost per month",
            [target(f"{rate_range} * {MONTH_SECONDS}", instant=True)],
            (6, y + 1, 6, 6),
            "currencyUSD",
            description="The range's average rate, projected to a 730-hour month.",
        ),
        panel(
            "timeseries",
            "Cost per day by traffic class",
            [target(by_class, "{{kzt_traffic_class}}")],
            (12, y + 1, 12, 6),
            "currencyUSD",
        ),
        table("Cost per month by workload (top 20)", by_wl, (0, y + 7, 24, 8), "currencyUSD"),
    ]


def savings_panels(y: int) -> list[dict[str, Any]]:
    svc = "service_namespace, service"
    recs = "sort_desc(sum by (namespace, service, workload, recommendation) (kzt_savings_usd_per_month))"
    svc_bytes = f"sum by ({svc}) (rate(kzt_service_traffic_bytes_total{{{CROSS}}}[$__rate_interval]))"
    svc_cost = (
        f'sum by ({svc}) (rate(kzt_savings_flow_cost_usd_total{{service!=""}}[$__rate_interval]))'
        f" * {MONTH_SECONDS}"
    )
    hide_time = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]
    return [
        row("Savings: what to change, what it saves", y),
        panel(
            "stat",
            "Savings available per month",
            [target("sum(kzt_savings_usd_per_month)", instant=True)],
            (0, y + 1, 5, 7),
            "currencyUSD",
            description="Every recommendation of the enricher's savings window, summed over replicas "
            "(each prices the flows its agents sent). `otel-kzt report` says what to change.",
        ),
        panel(
            "stat",
            "Savings on (Services readable)",
            [target("min(kzt_savings_enabled)", instant=True)],
            (5, y + 1, 4, 7),
            description="0 while a replica cannot list Services and EndpointSlices (see its log).",
        ),
        table(
            "Recommendations: what each change saves per month",
            recs,
            (9, y + 1, 15, 7),
            "currencyUSD",
            description="prefer-same-zone: set the routing the cluster accepts; spread-endpoints: run an "
            "endpoint in the clients' zones; zone-local-scrape: shard a scraper by zone.",
        ),
        panel(
            "timeseries",
            "Cross-zone bytes/s by Service (requests and responses)",
            [target(svc_bytes, "{{service_namespace}}/{{service}}")],
            (0, y + 8, 12, 7),
            "Bps",
            description="Traffic to and from each Service's endpoints; a routing change shows as a drop.",
        ),
        panel(
            "timeseries",
            "Billed cost per month by Service",
            [target(svc_cost, "{{service_namespace}}/{{service}}")],
            (12, y + 8, 12, 7),
            "currencyUSD",
        ),
        table(
            "Service routing (trafficDistribution or topology mode)",
            f"max by ({svc}, traffic_distribution) (kzt_service_routing_info)",
            (0, y + 15, 12, 7),
            transformations=hide_time,
        ),
        table(
            "Ready endpoints of each Service by zone",
            f"max by ({svc}, zone) (kzt_service_endpoints)",
            (12, y + 15, 12, 7),
        ),
    ]


def health_panels(y: int) -> list[dict[str, Any]]:
    def rate_by_instance(metric: str) -> str:
        return f"sum by (instance) (rate({metric}[$__rate_interval]))"

    return [
        row("Agent and enricher health", y),
        panel(
            "stat",
            "Agents reporting",
            [target(f"count(({AGENT_AGE}) < 120)")],
            (0, y + 1, 4, 6),
            description="Nodes whose agent reported to any replica in the last 2 minutes.",
        ),
        table("Seconds since each agent's last report", AGENT_AGE, (4, y + 1, 8, 6), "s"),
        panel(
            "stat", "Enricher replicas up", [target('sum(up{job="otel-kzt-enricher"})')], (12, y + 1, 4, 6)
        ),
        panel(
            "timeseries",
            "Metadata synced (1 = yes)",
            [target("kzt_enricher_metadata_synced", "{{instance}}")],
            (16, y + 1, 8, 6),
        ),
        panel(
            "timeseries",
            "Data points received / rejected per second",
            series(
                (rate_by_instance("kzt_enricher_received_data_points_total"), "received {{instance}}"),
                (rate_by_instance("kzt_enricher_rejected_data_points_total"), "rejected {{instance}}"),
            ),
            (0, y + 7, 12, 7),
            "short",
        ),
        panel(
            "timeseries",
            "Export failures and dropped items per second",
            series(
                (rate_by_instance("kzt_enricher_export_failures_total"), "failures {{instance}}"),
                (rate_by_instance("kzt_enricher_export_dropped_items_total"), "dropped {{instance}}"),
            ),
            (12, y + 7, 12, 7),
            "short",
        ),
        panel(
            "timeseries",
            "Series: active and dropped by the cap",
            series(
                ("sum by (instance) (kzt_enricher_series_active)", "active {{instance}}"),
                (rate_by_instance("kzt_enricher_series_dropped_total"), "dropped/s {{instance}}"),
            ),
            (0, y + 14, 12, 7),
            "short",
        ),
        panel(
            "timeseries",
            "Caches emptied at their cap per second",
            [
                target(
                    "sum by (instance, cache) (rate(kzt_enricher_cache_resets_total[$__rate_interval]))",
                    "{{cache}} {{instance}}",
                )
            ],
            (12, y + 14, 12, 7),
            "short",
            description="Nothing is lost, only time: an emptied cache's entries are made again. Steady "
            "emptying means more distinct addresses or series than a cache holds (DESIGN 5.6).",
        ),
    ]


def dashboard() -> dict[str, Any]:
    namespace_var = {
        "name": "namespace",
        "label": "Source namespace",
        "type": "query",
        "datasource": DS,
        "query": {"query": "label_values(kzt_flow_bytes_total, source_k8s_namespace_name)", "refId": "ns"},
        "definition": "label_values(kzt_flow_bytes_total, source_k8s_namespace_name)",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "refresh": 2,
        "sort": 1,
        "current": {"text": "All", "value": "$__all"},
    }
    panels = [*traffic_panels(0), *cost_panels(25), *savings_panels(41), *health_panels(63)]
    datasource_var = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
    }
    return {
        "uid": "otel-kzt-cross-zone",
        "title": "otel-kzt: cross-zone traffic and cost",
        "description": "Kubernetes cross-zone traffic, estimated cost, savings, agent and enricher health.",
        "tags": ["otel-kzt", "kubernetes", "network", "cost"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource_var, namespace_var]},
        "annotations": {"list": []},
        "panels": [{**p, "id": i} for i, p in enumerate(panels, start=1)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    return write_or_check(TARGET, render(), argv, Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
