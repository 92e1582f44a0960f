"""/metrics of a running enricher: an exposition rebuilt at most once a second that a scrape storm shares
(a storm that lasts, against the receivers: test_enricher_abuse.py), scrapes that write nothing, with
--state-file the last snapshot on disk (never more), every cache's emptyings at its cap, and exactly the
names otel_kzt.schema lists (deploy/'s rules are checked against it)."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Exposition
from otel_kzt.enricher.processing import resolution
from tests.integration.test_enricher_badinput import post
from tests.integration.test_enricher_prometheus import flow_request, send
from tests.integration.test_enricher_service import (
    POD_IPS,
    RUN_START_NS,
    api_pki,
    enricher_kubeconfig,
    get,
    local_config,
    metrics_showing,
    running,
    served_config,
    write_metadata,
)

__all__ = ["api_pki", "enricher_kubeconfig"]
WEB, CACHE = POD_IPS["web-1"], POD_IPS["cache-1"]
# Every capped cache of the enricher (processing/bounded.py Cap), by its `cache` label
CACHES = {
    "resolution.ends",
    "services.answers",
    "encoded.resources",
    "encoded.scopes",
    "encoded.headers",
    "pieces.by_pair",
    "pieces.by_field",
    "flowlogs.orders",
    "repeats.codes",
    "repeats.headers",
}


def scraped(port: int, name: str) -> list[Sample]:
    """The samples named `name` on the enricher's /metrics now."""
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return [s for family in text_string_to_metric_families(body) for s in family.samples if s.name == name]


def cross_zone(port: int) -> float | None:
    web = [
        s for s in scraped(port, schema.PROM_POD_CROSS_ZONE_BYTES + "_total") if s.labels["pod"] == "web-1"
    ]
    return float(web[0].value) if web else None


def test_the_exposition_is_rebuilt_at_most_once_a_second_and_shared() -> None:
    now = [0.0]
    exposition = Exposition(CollectorRegistry(), clock=lambda: now[0])
    with ThreadPoolExecutor(8) as pool:  # a storm at one instant: one rebuild, the others take its bytes
        bodies = set(pool.map(lambda _: exposition.render("")[0], range(64)))
    assert exposition.rebuilds == 1 and len(bodies) == 1
    now[0] = 0.9
    exposition.render("")
    assert exposition.rebuilds == 1
    now[0] = 1.0
    exposition.render("")
    exposition.render("application/openmetrics-text; version=1.0.0")  # each format has its own
    assert exposition.rebuilds == 3


def test_a_scrape_writes_nothing_and_metrics_shows_what_is_on_disk(
    enricher_kubeconfig: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state.json.zst"
    cfg = served_config(enricher_kubeconfig, state_file=str(state), checkpoint_interval_s=0.2)
    with running(cfg) as svc:
        port = svc.ports["metrics"]
        send(svc.ports["http"], [(WEB, CACHE, 1_000, RUN_START_NS)], RUN_START_NS + 10**9)
        deadline = time.monotonic() + 10
        while cross_zone(port) != 1_000:  # shown once the next checkpoint holds it
            assert time.monotonic() < deadline, "the checkpoint never showed the bytes"
            time.sleep(0.1)
    written = state.stat().st_mtime_ns  # the final checkpoint, at shutdown
    cfg = served_config(enricher_kubeconfig, state_file=str(state), checkpoint_interval_s=3600.0)
    with running(cfg) as svc:
        port = svc.ports["metrics"]
        assert cross_zone(port) == 1_000  # restored: never less than a scrape saw before the restart
        send(svc.ports["http"], [(WEB, CACHE, 5_000, RUN_START_NS)], RUN_START_NS + 2 * 10**9)
        for _ in range(20):
            assert cross_zone(port) == 1_000  # counted, but not on disk yet: not shown
        assert state.stat().st_mtime_ns == written  # the scrapes wrote nothing
    assert state.stat().st_mtime_ns > written


def cache_resets(port: int) -> dict[str, float]:
    return {
        s.labels[schema.ENRICHER_CACHE_LABEL]: s.value
        for s in scraped(port, schema.ENRICHER_CACHE_RESETS + "_total")
    }


def test_a_cache_emptied_at_its_cap_is_counted_on_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The resolver remembers 2 addresses (200,000 in production): the first series' two ends fill it, the
    # second series' source empties it once.
    monkeypatch.setattr(resolution, "_MAX_CACHED_ENDS", 2)
    with running(local_config(write_metadata(tmp_path / "cluster.json"))) as svc:
        port = svc.ports["metrics"]
        shown = cache_resets(port)
        assert set(shown) == CACHES and shown["resolution.ends"] == 0  # each cache from the start, at 0
        api, etl = POD_IPS["api-1"], POD_IPS["etl-1"]
        send(
            svc.ports["http"],
            [(WEB, CACHE, 1_000, RUN_START_NS), (api, etl, 500, RUN_START_NS)],
            RUN_START_NS,
        )
        metrics_showing(f"http://127.0.0.1:{port}/metrics", 'cache_resets_total{cache="resolution.ends"} 1.0')
        assert cross_zone(port) == 1_000  # nothing lost: the emptied cache's answers are made again


def agent_health_request(node: str) -> bytes:
    """One agent's report holding every kzt.agent.* metric the schema names, each as a one-point Sum (the
    enricher keeps the last value whatever the kind), with the `result`, `datapath` and `change`
    attributes."""
    req, _ = flow_request(node)
    scope = req.resource_metrics[0].scope_metrics[0]
    del scope.metrics[:]
    for name in sorted(v for k, v in vars(schema).items() if k.startswith("OTLP_AGENT_")):
        point = scope.metrics.add(name=name).sum.data_points.add(time_unix_nano=RUN_START_NS, as_double=1.0)
        point.attributes.add(key=schema.AGENT_RESULT).value.string_value = "ok"
        point.attributes.add(key=schema.AGENT_DATAPATH_LABEL).value.string_value = "netfilter"
        point.attributes.add(key=schema.AGENT_DEVICE_CHANGE_LABEL).value.string_value = "added"
    return bytes(req.SerializeToString())


def test_metrics_shows_exactly_the_names_the_schema_lists(tmp_path: Path) -> None:
    # Everything a scrape can show: a flow (the aggregates), an agent's full health report (its families
    # appear only once an agent reported), a checkpoint (--state-file).
    cfg = local_config(write_metadata(tmp_path / "cluster.json"), state_file=str(tmp_path / "state"))
    with running(cfg) as svc:
        send(svc.ports["http"], [(WEB, CACHE, 1_000, RUN_START_NS)], RUN_START_NS + 10**9)
        assert post(svc.ports["http"], agent_health_request("kzt-e-a1"))[0] == 200
        url = f"http://127.0.0.1:{svc.ports['metrics']}/metrics"
        body = metrics_showing(url, schema.AGENT_DATAPATH_COVERAGE)
    families = list(text_string_to_metric_families(body))
    by_type: dict[str, set[str]] = {}
    for family in families:
        by_type.setdefault(family.type, set()).add(family.name)
    assert by_type.pop("counter") == schema.ENRICHER_PROM_COUNTERS
    # the text format gives a client-library counter's creation time as a gauge of its own, `<name>_created`
    created = {
        name for name in by_type["gauge"] if name.removesuffix("_created") in schema.ENRICHER_PROM_COUNTERS
    }
    assert by_type.pop("gauge") - created == schema.ENRICHER_PROM_GAUGES
    assert not by_type  # no histogram, summary or untyped family
    labels = {label for family in families for sample in family.samples for label in sample.labels}
    assert labels <= schema.ENRICHER_PROM_LABELS, labels - schema.ENRICHER_PROM_LABELS
    shown = {schema.ENRICHER_RECEIVER_LABEL, schema.ENRICHER_READ_LABEL, schema.ENRICHER_CACHE_LABEL}
    assert shown <= labels  # the families with samples did show their labels


def refused_connections(port: int) -> dict[str, float]:
    """kzt_enricher_receiver_refused_total{reason="max_connections"} by receiver (port)."""
    return {
        s.labels[schema.ENRICHER_RECEIVER_LABEL]: s.value
        for s in scraped(port, schema.ENRICHER_RECEIVER_REFUSED + "_total")
        if s.labels[schema.ENRICHER_RECEIVER_REASON_LABEL] == schema.ENRICHER_REFUSED_CONNECTIONS
    }


def test_the_metrics_ports_connection_cap_is_counted_like_the_receivers(tmp_path: Path) -> None:
    cfg = local_config(write_metadata(tmp_path / "cluster.json"), max_connections=3, header_timeout_s=1.0)
    with running(cfg) as svc:
        port = svc.ports["metrics"]
        assert refused_connections(port) == {"http": 0, "metrics": 0}
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as over:
                over.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert over.recv(4096).startswith(b"HTTP/1.1 503")
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while refused_connections(port) != {"http": 0, "metrics": 1}:  # rebuilt at most once a second
            assert time.monotonic() < deadline, refused_connections(port)
            time.sleep(0.2)
