"""Every dashboard query and every rule runs against a real Prometheus scraping a real enricher.

The stack: `otel-kzt enricher` (subprocess, metadata from the test API server with its own token, one
downstream export endpoint that refuses connections, with a 1-item queue and 1s of retries, so that export
failures and drops happen and their series exist), three agents' export loops (metadata from the same server
with the agent's token) sending realistic flows over OTLP/gRPC, and Debian's Prometheus scraping every second
with deploy/prometheus/rules.yaml loaded (group intervals shortened to 1s in a temporary copy, nothing else
changed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_kzt import schema
from tests.integration import deploy_agents as da
from tests.integration import deploy_files as df
from tests.integration import deploy_stack as ds
from tests.support.k8s_cluster import ENRICHER, ServedCluster

pytestmark = pytest.mark.integration

# What Grafana would put in for the template variables (scrape interval 1s: rate windows of 4s hold 4).
SUBSTITUTIONS = {"$__rate_interval": "4s", "$__range": "1m", "$namespace": ".*"}
JOB = "otel-kzt-enricher"
# Agents' series a datapath mode exposes only where it measures them (coverage: DESIGN §3a): their rules
# must evaluate, but these agents' datapath has none to show.
MEASURED_BY_SOME_MODES = {schema.AGENT_DATAPATH_COVERAGE}


def substitute(expr: str) -> str:
    for name, value in SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ds.PrometheusProcess]:
    work = tmp_path_factory.mktemp("kx-prom")
    with da.served(work, services=True) as control:
        yield from _stack(work, control)


def _stack(work: Path, control: ServedCluster) -> Iterator[ds.PrometheusProcess]:
    dead = f"http://{ds.LOCALHOST}:{ds.free_port()}"  # nothing listens: exports fail and are counted
    exporters = [{"endpoint": dead, "queue_size": 1, "max_elapsed": "1s", "timeout": "500ms"}]
    enricher_config = work / "kx-enricher.yaml"
    enricher_config.write_text(yaml.safe_dump({"exporters": exporters}))
    rules = yaml.safe_load(df.RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    rules_path = work / "kx-rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules))
    closers: list[Any] = []
    try:
        enricher = ds.EnricherProcess(
            work, control.args(ENRICHER), "kx-enricher", ["--config", str(enricher_config)]
        )
        closers.append(enricher.stop)
        enricher.wait_ready()
        for node in da.NODES:
            closers.append(da.start_agent(node, [enricher.otlp_url], control).close)
        prometheus = ds.PrometheusProcess(work, {JOB: [enricher.metrics_target]}, [rules_path])
        closers.append(prometheus.stop)
        # Enough scrapes for every rate window, and one rule evaluation after the data arrived.
        ds.wait_for(
            lambda: (
                len(prometheus.query("kzt_flow_bytes_total[8s]")) > 0
                and len(prometheus.query("kzt_flow_bytes_total[8s]")[0]["values"]) >= 6
            ),
            40,
            "6 scrapes of kzt_flow_bytes_total",
        )
        ds.wait_for(
            lambda: bool(prometheus.query("kzt:workload_cross_zone_bytes:rate30m")), 20, "the recording rules"
        )
        yield prometheus
    finally:
        for close in reversed(closers):
            close()


def _targets() -> list[tuple[str, dict[str, Any]]]:
    return df.dashboard_targets()


@pytest.mark.parametrize(("title", "target"), _targets(), ids=[f"{t}:{x['refId']}" for t, x in _targets()])
def test_dashboard_query_returns_data(
    stack: ds.PrometheusProcess, title: str, target: dict[str, Any]
) -> None:
    expr = target["expr"]
    if expr.startswith("label_values("):
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr).groups()  # type: ignore[union-attr]
        data = stack.api("label/" + label + "/values", **{"match[]": metric})
        assert data["status"] == "success" and "shop" in data["data"], data
        return
    result = stack.query(substitute(expr))
    assert result, f"{title}: no data for {expr}"
    if not target.get("instant"):
        end = float(result[0]["value"][0])
        data = stack.api("query_range", query=substitute(expr), start=str(end - 5), end=str(end), step="1")
        assert data["status"] == "success" and data["data"]["result"], f"{title}: no range data"


def test_cross_zone_figures_are_the_ones_sent(stack: ds.PrometheusProcess) -> None:
    # The zone matrix holds both cross-zone directions and the same-zone diagonal, and nothing else.
    rows = stack.query(
        substitute(
            "sum by (source_cloud_availability_zone, destination_cloud_availability_zone) "
            "(kzt_zone_traffic_bytes_total)"
        )
    )
    pairs = {
        (r["metric"]["source_cloud_availability_zone"], r["metric"]["destination_cloud_availability_zone"])
        for r in rows
    }
    assert pairs == {("us-east-1a", "us-east-1a"), ("us-east-1a", "us-east-1b"), ("us-east-1b", "us-east-1a")}
    talkers = stack.query("topk(1, sum by (namespace, pod) (pod_cross_zone_network_traffic_bytes_total))")
    assert talkers[0]["metric"]["pod"] == "cache-0"  # 380 kB per tick, the biggest cross-zone sender


def test_every_rule_evaluates_without_error(stack: ds.PrometheusProcess) -> None:
    groups = stack.api("rules")["data"]["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    expected = {
        r.get("alert") or r["record"]
        for g in yaml.safe_load(df.RULES.read_text())["groups"]
        for r in g["rules"]
    }
    assert set(evaluated) == expected
    for name, rule in evaluated.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    for record in ("kzt:workload_cross_zone_bytes:rate30m", "kzt:estimated_cost_usd:per_day_rate1h"):
        assert stack.query(record), record


def test_alert_inputs_exist_and_alerts_fire_only_where_true(stack: ds.PrometheusProcess) -> None:
    for group in yaml.safe_load(df.RULES.read_text())["groups"]:
        for rule in group["rules"]:
            stack.query(rule["expr"])  # runs
            for metric in df.promql_metrics(rule["expr"]) - MEASURED_BY_SOME_MODES:
                assert stack.query(f"count({metric})"), f"{rule.get('alert') or rule['record']}: no {metric}"

    def active() -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in stack.api("alerts")["data"]["alerts"]}

    ds.wait_for(lambda: len(active()) >= 2, 15, "the export alerts")
    # Exports go to a closed port: failing (pending, `for: 15m`) and dropping (no `for`: firing at once).
    # Everything else is healthy, so nothing else is active.
    assert active() == {"KztEnricherExportFailing": "pending", "KztEnricherExportDropping": "firing"}


def test_savings_panels_show_the_cache_recommendation(stack: ds.PrometheusProcess) -> None:
    """web and api (zone a) read cache (its one endpoint in zone b): run an endpoint in zone a."""
    rows = stack.query("sum by (namespace, service, recommendation) (kzt_savings_usd_per_month)")
    assert [(r["metric"]["namespace"], r["metric"]["service"], r["metric"]["recommendation"])
            for r in rows] == [("shop", "cache", "spread-endpoints")]  # fmt: skip
    assert float(rows[0]["value"][1]) > 0
    endpoints = stack.query("max by (zone) (kzt_service_endpoints)")
    assert {r["metric"]["zone"]: float(r["value"][1]) for r in endpoints} == {"us-east-1b": 1.0}
