"""The web view at `/` in headless Chromium: with traffic stopped, its zone matrix and top talkers equal
what `/metrics` says; a screenshot is kept as an artifact (test-artifacts/web-view.png)."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.demo.view import workload
from tests.conftest import REPO
from tests.integration.test_enricher_badinput import post
from tests.integration.test_enricher_prometheus import send
from tests.integration.test_enricher_service import NODE_IPS, POD_IPS, get, local_config, running
from tests.support import browser
from tests.unit.test_enricher_agents import agent_pass

pytestmark = pytest.mark.integration
ARTIFACTS = Path(os.environ.get("KZT_TEST_ARTIFACTS", REPO / "test-artifacts"))
L = schema.prom_label
PAIR = tuple(L(a) for a in (
    schema.SOURCE_NAMESPACE_NAME, schema.SOURCE_WORKLOAD_KIND, schema.SOURCE_WORKLOAD_NAME,
    schema.DESTINATION_NAMESPACE_NAME, schema.DESTINATION_WORKLOAD_KIND, schema.DESTINATION_WORKLOAD_NAME,
))  # fmt: skip


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name]  # fmt: skip


def _from_metrics(text: str) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """(zone pair -> bytes, (source, destination) -> cross-zone bytes) as /metrics has them."""
    zones = {(lb[L(schema.SOURCE_ZONE)], lb[L(schema.DESTINATION_ZONE)]): v
             for lb, v in _samples(text, f"{schema.PROM_ZONE_TRAFFIC_BYTES}_total")}
    talkers: dict[tuple[str, str], float] = defaultdict(float)
    for lb, v in _samples(text, f"{schema.PROM_FLOW_BYTES}_total"):
        if lb[L(schema.TRAFFIC_CLASS)] == "cross-zone" and v > 0:
            key = [lb.get(k, "") for k in PAIR]
            talkers[(workload(*key[:3]), workload(*key[3:]))] += v
    return zones, dict(talkers)


def _from_page(html: str) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    page = browser.parse(html)
    zones = {(a["data-source-zone"], a["data-destination-zone"]): float(a["data-bytes"])
             for a, _ in page.select("td", "cell") if float(a["data-bytes"]) > 0}
    sources, destinations, totals = (page.select("td", c) for c in ("source", "destination", "total"))
    talkers = {(s, d): float(t["data-bytes"]) for (_, s), (_, d), (t, _) in zip(sources, destinations, totals,
                                                                                strict=True)}
    return zones, talkers


AGENT_GAUGES = (schema.AGENT_FLOWS_TRACKED, schema.AGENT_MAP_FILL_RATIO, schema.AGENT_METADATA_SYNCED)
NODE = schema.prom_label(schema.RESOURCE_NODE_NAME)


def _agents_from_metrics(text: str) -> dict[str, dict[str, object]]:
    """Per node: the agents' gauges, overflow bytes and exports by result, as /metrics has them."""
    out: dict[str, dict[str, object]] = defaultdict(dict)
    for name in (*AGENT_GAUGES, f"{schema.AGENT_OVERFLOW_BYTES}_total"):
        for lb, v in _samples(text, name):
            out[lb[NODE]][name.removesuffix("_total")] = v
    for lb, v in _samples(text, f"{schema.AGENT_EXPORTS}_total"):
        exports = out[lb[NODE]].setdefault("exports", {})
        exports[lb[schema.AGENT_RESULT]] = v  # type: ignore[index]
    return dict(out)


def _agents_from_page(page: browser.Elements) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = defaultdict(dict)
    for attrs, _ in page.select("td", "num"):
        if "data-metric" in attrs:
            out[attrs["data-node"]][attrs["data-metric"]] = float(attrs["data-value"])
        elif "data-exports" in attrs and attrs["data-exports"] != "{}":
            out[attrs["data-node"]]["exports"] = json.loads(attrs["data-exports"])
    return dict(out)


def test_matrix_and_talkers_on_the_page_equal_metrics(tmp_path: Path) -> None:
    from tests.integration.test_enricher_service import write_metadata

    with running(local_config(write_metadata(tmp_path / "cluster.json"))) as svc:
        base = f"http://127.0.0.1:{svc.ports['metrics']}"
        start = time.time_ns()  # after the enricher started: each run's first value counts whole
        now = start + 10**9
        points = [
            (POD_IPS["web-1"], POD_IPS["cache-1"], 123_457, start),  # zone a -> b
            (POD_IPS["cache-1"], POD_IPS["web-1"], 2_000_003, start),  # b -> a
            (POD_IPS["api-1"], POD_IPS["cache-1"], 77_001, start),  # a -> b
            (POD_IPS["web-1"], POD_IPS["api-1"], 5_000, start),  # a -> a (same zone)
            (POD_IPS["cache-1"], NODE_IPS["kzt-e-a2"], 9_999, start),  # b -> a node
        ]
        send(svc.ports["http"], points, now)
        later = [(s, d, v * 2, st) for s, d, v, st in points]
        send(svc.ports["http"], later, now + 10**9)  # then the traffic stops
        _, telemetry = agent_pass("kzt-e-b1")  # a real agent pass: its flows and its own health
        assert post(svc.ports["http"], telemetry)[0] == 200
        metrics = get(f"{base}/metrics")[1]
        zones, talkers = _from_metrics(metrics)
        assert zones[("us-east-1b", "us-east-1a")] == 2 * (2_000_003 + 9_999)  # both reports counted
        summary = json.loads(get(f"{base}/api/v1/summary")[1])
        assert {(z["source_zone"], z["destination_zone"]): z["bytes"] for z in summary["zones"]} == zones
        page_zones, page_talkers = _from_page(browser.dump_dom(base + "/"))
        assert page_zones == zones
        assert page_talkers == talkers
        assert page_talkers[("shop/cache", "shop/web")] == 4_000_006
        page = browser.parse(browser.dump_dom(base + "/"))
        health = _agents_from_metrics(get(f"{base}/metrics")[1])
        assert health["kzt-e-b1"]["kzt_agent_flows_tracked"] == 3  # the pass's three flows
        assert _agents_from_page(page) == health
        shot = browser.screenshot(base + "/", ARTIFACTS / "web-view.png")
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_files_and_api_are_served(tmp_path: Path) -> None:
    from tests.integration.test_enricher_service import write_metadata

    with running(local_config(write_metadata(tmp_path / "cluster.json"))) as svc:
        base = f"http://127.0.0.1:{svc.ports['metrics']}"
        status, body = get(base + "/")
        assert status == 200 and "<script src=\"app.js\"></script>" in body
        assert get(base + "/app.js")[0] == 200 and get(base + "/style.css")[0] == 200
        savings = json.loads(get(base + "/api/v1/savings")[1])
        assert set(savings) >= {"enabled", "reason", "recommendations", "services", "window_seconds"}
        assert get(base + "/nothing-here")[0] == 404


def _recs_from_page(html: str) -> dict[tuple[str, str], float]:
    page = browser.parse(html)
    kinds = [a["data-kind"] for a, _ in page.select("tr", "recommendation")]
    saves = [float(a["data-usd"]) for a, _ in page.select("td", "saving")]
    # The "for" cell: the second cell of each recommendation row (document order).
    cells = [(tag, attrs, "".join(text).strip()) for tag, attrs, text in page.found]
    fors = []
    for i, (tag, attrs, _) in enumerate(cells):
        if tag == "tr" and "recommendation" in attrs.get("class", "").split():
            tds = [c for c in cells[i + 1:] if c[0] == "td"]
            fors.append(tds[1][2])
    return {(k, f): u for k, f, u in zip(kinds, fors, saves, strict=True)}


def test_recommendations_on_the_page_equal_the_savings_api(tmp_path: Path) -> None:
    from tests.integration.test_savings_prometheus import Traffic, write_cache_metadata

    with running(local_config(write_cache_metadata(tmp_path / "cluster.json"))) as svc:
        base = f"http://127.0.0.1:{svc.ports['metrics']}"
        Traffic(svc.ports["http"]).run(3)  # web (zone a) reads the cache Service's pod in zone b
        deadline = time.monotonic() + 20
        while not json.loads(get(f"{base}/api/v1/savings")[1])["recommendations"]:
            assert time.monotonic() < deadline, "no recommendation within 20 s"
            time.sleep(0.5)
        for _ in range(4):  # a savings step between the reads changes the rates: read again
            before = json.loads(get(f"{base}/api/v1/savings")[1])
            html = browser.dump_dom(base + "/")
            after = json.loads(get(f"{base}/api/v1/savings")[1])
            if before == after:
                break
        else:
            pytest.fail("the savings report changed during every page load")
        want = {(r["recommendation"], f"{r['namespace']}/{r['service']}"): r["usd_per_month"]
                for r in after["recommendations"]}  # fmt: skip
        assert list(want) == [("prefer-same-zone", "shop/cache")] and _recs_from_page(html) == want
        assert "routing setting this cluster accepts: PreferSameZone" in html
        shot = browser.screenshot(base + "/", ARTIFACTS / "web-view-savings.png")
        assert shot.stat().st_size > 20_000
