"""`otel-kzt report --prometheus` against Debian's real Prometheus scraping a real enricher.

The enricher reads a Service (endpoints in two zones) from its metadata file and receives a client's
requests and responses through OTLP/HTTP; Prometheus scrapes it every second. The report rebuilt from
Prometheus must say what the enricher says: the same recommendations for the same Services with the same
setting, the same routing and endpoints, and rates over a full window within 10 % (Prometheus'
`increase()` extrapolates to the window's edges); after the Service's routing changes, the same moment and the
before and after windows. The CLI prints the same report as JSON and as a table.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_kzt import schema
from otel_kzt.savings.jsonform import report_from_json
from otel_kzt.savings.model import Kind, Report
from otel_kzt.savings.promsource import from_prometheus
from otel_kzt.savings.sources import from_enricher
from tests.conftest import REPO
from tests.integration.deploy_stack import PrometheusProcess
from tests.integration.test_enricher_badinput import post
from tests.integration.test_enricher_prometheus import flow_request
from tests.integration.test_enricher_service import (
    POD_IPS,
    RUN_START_NS,
    local_config,
    running,
    write_metadata,
)
from tests.support.k8s_objects import as_list, fresh, make_pod
from tests.support.processes import CLI
from tests.support.service_fixtures import slice_for

pytestmark = pytest.mark.integration

WINDOW_S = 30.0  # traffic runs longer than the window: both sides rate one full window
CACHE = ("shop", "cache")
CACHE_0 = "10.1.0.9"  # a second cache pod, on node a2 (zone a); cache-1 is in zone b
PORT = 6379
TOLERANCE = 0.10


def write_cache_metadata(path: Path, distribution: str | None = None) -> Path:
    """test_enricher_service's cluster plus the `cache` Service: endpoints in zone a (cache-0) and b."""
    base = json.loads(write_metadata(path).read_text())["items"]
    base.append(make_pod("cache-0", "kzt-e-a2", [CACHE_0], owner=("StatefulSet", "cache"),
                         template_hash=None))
    svc = fresh("service-clusterip")
    svc["metadata"]["name"] = "cache"
    svc["spec"]["ports"] = [{"name": "redis", "protocol": "TCP", "port": PORT, "targetPort": PORT}]
    if distribution:
        svc["spec"]["trafficDistribution"] = distribution
    cache = slice_for("cache", "shop", [(CACHE_0, "us-east-1a"), (POD_IPS["cache-1"], "us-east-1b")], PORT)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(as_list([*base, svc, cache])))
    tmp.replace(path)
    return path


def _send(port: int, request: int, response: int, t: int) -> None:
    """web-1 (zone a) -> cache-1:6379 (zone b) and back, cumulative, as an agent reports them."""
    req, metric = flow_request("kzt-e-a1")
    for src, dst, ports, value in (
        (POD_IPS["web-1"], POD_IPS["cache-1"], {schema.DESTINATION_PORT: str(PORT)}, request),
        (POD_IPS["cache-1"], POD_IPS["web-1"], {schema.SOURCE_PORT: str(PORT)}, response),
    ):
        dp = metric.sum.data_points.add(start_time_unix_nano=RUN_START_NS, time_unix_nano=t, as_int=value)
        for key, text in {schema.SOURCE_ADDRESS: src, schema.DESTINATION_ADDRESS: dst,
                          schema.NETWORK_TRANSPORT: "tcp", **ports}.items():  # fmt: skip
            dp.attributes.add(key=key).value.string_value = text
    assert post(port, req.SerializeToString())[0] == 200


class Traffic:
    def __init__(self, http_port: int) -> None:
        self.port, self.request, self.response, self.t = http_port, 0, 0, RUN_START_NS

    def run(self, seconds: int) -> None:
        """Steady traffic: one report a second, 2 kB up and 60 kB down per second."""
        for _ in range(seconds):
            self.request += 2_000
            self.response += 60_000
            self.t += 10**9
            _send(self.port, self.request, self.response, self.t)
            time.sleep(1.0)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Any, PrometheusProcess, Path]]:
    metadata = write_cache_metadata(tmp_path / "cluster.json")
    with running(local_config(metadata, savings_window_s=WINDOW_S)) as svc:
        prom = PrometheusProcess(tmp_path, {"kzt": [f"127.0.0.1:{svc.ports['metrics']}"]})
        try:
            yield svc, prom, metadata
        finally:
            prom.stop()


def _scraped(prom: PrometheusProcess, expr: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not prom.query(expr):
        assert time.monotonic() < deadline, f"Prometheus never held {expr}"
        time.sleep(0.5)


def _recs(report: Report) -> dict[tuple[Kind, str, str], Any]:
    return {(r.kind, r.namespace, r.service): r for r in report.recommendations}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(abs(a), abs(b))


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "report", "--prometheus", url, "--window",
                           f"{WINDOW_S:.0f}s", *args], capture_output=True, text=True, cwd=REPO, timeout=60,
                          check=False)  # fmt: skip


Stack = tuple[Any, PrometheusProcess, Path]


def test_report_from_prometheus_says_what_the_enricher_says(stack: Stack) -> None:
    svc, prom, metadata = stack
    base = f"http://127.0.0.1:{svc.ports['metrics']}"
    traffic = Traffic(svc.ports["http"])
    _scraped(prom, f"{schema.PROM_SAVINGS_ENABLED} == 1")
    traffic.run(int(WINDOW_S) + 6)
    time.sleep(2)  # two more scrapes hold the last values
    mine, theirs = from_enricher(base), from_prometheus(prom.url, WINDOW_S)
    assert mine.enabled and theirs.enabled
    assert (theirs.setting, theirs.kubernetes_version) == (mine.setting, mine.kubernetes_version) == (
        "PreferSameZone", "")
    assert set(_recs(theirs)) == set(_recs(mine)) == {(Kind.PREFER_SAME_ZONE, *CACHE)}
    for key, rec in _recs(mine).items():
        other = _recs(theirs)[key]
        assert other.endpoints_by_zone == rec.endpoints_by_zone == {"us-east-1a": 1, "us-east-1b": 1}
        assert other.action == rec.action and other.zones == rec.zones == ("us-east-1a",)
        assert _close(other.bytes_per_second, rec.bytes_per_second), (other.bytes_per_second,
                                                                      rec.bytes_per_second)
        assert _close(other.usd_per_month, rec.usd_per_month), (other.usd_per_month, rec.usd_per_month)
        assert [(e.direction, e.client_zone, e.server_zone) for e in other.evidence] == [
            (e.direction, e.client_zone, e.server_zone) for e in rec.evidence]
    (s_mine,), (s_theirs,) = mine.services, theirs.services
    assert (s_theirs.namespace, s_theirs.name, s_theirs.routing) == (*CACHE, schema.ROUTING_NONE)
    assert s_theirs.routing == s_mine.routing and s_theirs.change is None

    # The Service is routed (kubectl patch): the enricher notes the moment; Prometheus holds it too.
    write_cache_metadata(metadata, "PreferSameZone")
    _scraped(prom, schema.PROM_SERVICE_ROUTING_CHANGE)
    traffic.run(10)
    time.sleep(2)
    mine, theirs = from_enricher(base), from_prometheus(prom.url, WINDOW_S)
    (s_mine,), (s_theirs,) = mine.services, theirs.services
    assert s_mine.change is not None and s_theirs.change is not None
    assert s_theirs.change.at == pytest.approx(s_mine.change.at, abs=1e-3)
    assert (s_theirs.change.routing_before, s_theirs.change.routing_after) == (
        s_mine.change.routing_before, s_mine.change.routing_after) == (schema.ROUTING_NONE, "PreferSameZone")
    assert _close(s_theirs.change.before.bytes_per_second, s_mine.change.before.bytes_per_second), (
        s_theirs.change.before, s_mine.change.before)
    assert _close(s_theirs.change.after.bytes_per_second, s_mine.change.after.bytes_per_second), (
        s_theirs.change.after, s_mine.change.after)
    assert not _recs(theirs) and "already routed PreferSameZone" in s_theirs.note

    as_json = _cli(prom.url, "--output", "json")
    assert as_json.returncode == 0, as_json.stderr
    printed = report_from_json(json.loads(as_json.stdout))
    assert printed.enabled
    assert [(s.name, s.routing) for s in printed.services] == [("cache", "PreferSameZone")]
    assert printed.services[0].change is not None
    table = _cli(prom.url)
    assert table.returncode == 0 and prom.url in table.stdout
    row = next(line for line in table.stdout.splitlines() if "shop/cache" in line)
    assert "PreferSameZone" in row and ": none" in row  # the change, when and from what (cells wrap)
    assert "before" in table.stdout and "after" in table.stdout and "over 0.5 min" in table.stdout


def test_prometheus_without_the_enricher_is_a_clear_error(tmp_path: Path) -> None:
    prom = PrometheusProcess(tmp_path, {"nothing": ["127.0.0.1:9"]})  # a port nobody serves
    try:
        proc = _cli(prom.url)
    finally:
        prom.stop()
    assert proc.returncode == 1 and "is it scraping an otel-kzt enricher?" in proc.stderr
