"""A real Prometheus (Debian's) scrapes the enricher; kubezonnet's README queries name the right pods, and
an agent restart (new start time) and an enricher restart keep the counters right: with --state-file the
enricher restart is no reset at all; without it Prometheus sees one, and the runs the new process meets
are baselines (what they carried across the restart is not counted: never twice, DESIGN §4).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE, Metric

from otel_kzt import schema
from otel_kzt.enricher.service import EnricherService
from tests.conftest import require
from tests.integration.test_enricher_badinput import post
from tests.integration.test_enricher_service import (
    POD_IPS,
    api_pki,
    enricher_kubeconfig,
    get,
    served_config,
    wait_ready,
)
from tests.support.ports import free_port

__all__ = ["api_pki", "enricher_kubeconfig"]
PROMETHEUS = "/usr/bin/prometheus"
RATE_QUERY = "topk(20, rate(pod_cross_zone_network_traffic_bytes_total[5m])) / 1e6"
INCREASE_QUERY = "topk(20, increase(pod_cross_zone_network_traffic_bytes_total[1w])) / 1e6"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """(query base URL, the metrics port it scrapes every second); killed whatever happens."""
    require(shutil.which(PROMETHEUS) is not None, "Debian's prometheus is not installed (scripts/setup.sh)")
    target, web = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: kzt, static_configs: [{{targets: ['127.0.0.1:{target}']}}]}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{web}"
        for _ in range(200):
            if proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}"
                )
            try:
                if get(f"{base}/-/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        yield base, target
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def query(base: str, promql: str) -> list[dict[str, object]]:
    status, body = get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200, body
    result: list[dict[str, object]] = json.loads(body)["data"]["result"]
    return result


def flow_request(node: str = "kzt-e-a1") -> tuple[ExportMetricsServiceRequest, Metric]:
    """An agent's request from `node` holding an empty cumulative flow-bytes sum to fill."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key=schema.RESOURCE_NODE_NAME).value.string_value = node
    metric = rm.scope_metrics.add().metrics.add(name=schema.FLOW_BYTES, unit="By")
    metric.sum.is_monotonic = True
    metric.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
    return req, metric


def send(port: int, points: list[tuple[str, str, int, int]], t: int) -> None:
    req, metric = flow_request()
    for src, dst, value, start in points:
        dp = metric.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=t, as_int=value)
        dp.attributes.add(key=schema.SOURCE_ADDRESS).value.string_value = src
        dp.attributes.add(key=schema.DESTINATION_ADDRESS).value.string_value = dst
    assert post(port, req.SerializeToString())[0] == 200


def start_service(kubeconfig: Path, metrics_port: int, state_file: Path | None = None) -> EnricherService:
    svc = EnricherService(
        served_config(
            kubeconfig,
            metrics_endpoint=f"127.0.0.1:{metrics_port}",
            state_file=str(state_file) if state_file else None,
            checkpoint_interval_s=0.2,  # /metrics shows what is on disk: soon after each report
        )
    )
    svc.start()
    wait_ready(svc)
    return svc


def wait_scrapes(base: str, n: int = 2) -> None:
    """Let Prometheus take `n` more scrapes of the current values."""
    scrapes = 'count_over_time(up{job="kzt"}[1h])'  # `up` gets one sample per scrape
    before = query(base, scrapes)
    start = float(before[0]["value"][1]) if before else 0.0  # type: ignore[index]
    for _ in range(200):
        now = query(base, scrapes)
        if now and float(now[0]["value"][1]) >= start + n:  # type: ignore[index]
            return
        time.sleep(0.1)
    raise AssertionError("prometheus is not scraping")


@pytest.mark.integration
@pytest.mark.parametrize("stateful", [False, True], ids=["no-state-file", "state-file"])
def test_kubezonnet_queries_and_restarts(
    prometheus: tuple[str, int], enricher_kubeconfig: Path, tmp_path: Path, stateful: bool
) -> None:
    base, port = prometheus
    web, api, cache, etl = (POD_IPS[p] for p in ("web-1", "api-1", "cache-1", "etl-1"))
    state = tmp_path / "enricher-state.json.gz" if stateful else None
    svc = start_service(enricher_kubeconfig, port, state)
    try:
        # agent start times (s1, and s2 after web's agent restarted): after this enricher's start-up,
        # before the next one's (its start-up is what it could have seen from)
        s1 = time.time_ns()
        s2 = t = s1 + 1_000
        # (web-1 -> cache-1 cumulative, its start, api-1 -> etl-1 cumulative); web -> api is same-zone
        steps = [
            (1_000_000, s1, 300_000),
            (2_000_000, s1, 400_000),
            (500_000, s2, 500_000),  # web's agent restarted: its counter starts again from a new start time
        ]
        for web_bytes, web_start, api_bytes in steps:
            t += 1_000_000_000
            send(
                svc.ports["http"],
                [(web, cache, web_bytes, web_start), (api, etl, api_bytes, s1), (web, api, 50_000_000, s1)],
                t,
            )
            wait_scrapes(base)
        svc.shutdown()  # enricher restart: without a state file the new one counts from zero
        svc = start_service(enricher_kubeconfig, port, state)
        send(svc.ports["http"], [(web, cache, 900_000, s2), (api, etl, 600_000, s1)], t + 1_000_000_000)
        send(svc.ports["http"], [(web, cache, 1_000_000, s2), (api, etl, 650_000, s1)], t + 2_000_000_000)
        wait_scrapes(base, 3)
    finally:
        svc.shutdown()

    rate = query(base, RATE_QUERY)
    assert [r["metric"]["pod"] for r in rate] == ["web-1", "api-1"]  # type: ignore[index]
    assert all(r["metric"]["namespace"] in ("shop", "batch") for r in rate)  # type: ignore[index]
    increase = {r["metric"]["pod"]: float(r["value"][1]) for r in query(base, INCREASE_QUERY)}  # type: ignore[index]
    assert set(increase) == {"web-1", "api-1"}
    assert increase["web-1"] > increase["api-1"] > 0

    web_series = 'pod_cross_zone_network_traffic_bytes_total{pod="web-1"}'
    if stateful:
        assert_no_reset(base, increase)
        return
    # the agent restart is not a reset for Prometheus (2.0 MB -> 2.5 MB); the enricher restart is one, after
    # which the runs it meets are baselines (their 0.9 MB not counted) and only the next 0.1 MB counts
    assert float(query(base, f"resets({web_series}[1w])")[0]["value"][1]) == 1  # type: ignore[index]
    assert float(query(base, f"max_over_time({web_series}[1w])")[0]["value"][1]) == 2_500_000  # type: ignore[index]
    assert float(query(base, web_series)[0]["value"][1]) == 100_000  # type: ignore[index]
    # Prometheus' increase() across both restarts: first sample 1.0 MB .. 2.5 MB, then 0.1 MB after the reset
    assert 1.6 <= increase["web-1"] <= 1.6 * 3


def assert_no_reset(base: str, increase: dict[str, float]) -> None:
    """With --state-file: the kubezonnet counters carry on over the enricher restart."""
    # web -> cache: 1.0 MB, 2.0 MB, agent restart 0.5 MB (total 2.5), after the enricher restart 0.9 and
    # 1.0 MB of the same agent series: 0.5 MB more. api -> etl (cross-region): 0.3 .. 0.65 MB.
    for pod, first, last in (("web-1", 1_000_000, 3_000_000), ("api-1", 300_000, 650_000)):
        series = f'pod_cross_zone_network_traffic_bytes_total{{pod="{pod}"}}'
        assert float(query(base, f"resets({series}[1w])")[0]["value"][1]) == 0  # type: ignore[index]
        assert float(query(base, series)[0]["value"][1]) == last  # type: ignore[index]
        spanned = query(base, f"max_over_time({series}[1w]) - min_over_time({series}[1w])")
        assert float(spanned[0]["value"][1]) == last - first  # type: ignore[index]  # the true bytes
        # increase() extrapolates to the window's ends by at most ~1 scrape interval of a >=10 s history;
        # a reset would have added the whole 0.9 / 0.6 MB cumulative value on top
        assert last - first <= increase[pod] * 1e6 <= (last - first) * 1.25, (pod, increase[pod])
