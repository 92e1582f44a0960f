"""/metrics of a running enricher: an exposition rebuilt at most once a second that a scrape storm shares,
scrapes that write nothing, with --state-file the last snapshot on disk (never more), and every cache's
emptyings at its cap."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Exposition
from otel_kzt.enricher.processing import resolution
from tests.integration.test_enricher_prometheus import send
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
}


def cross_zone(port: int) -> float | None:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == schema.PROM_POD_CROSS_ZONE_BYTES + "_total" and sample.labels["pod"] == "web-1":
                return float(sample.value)
    return None


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


def test_a_scrape_storm_leaves_the_receivers_answering(enricher_kubeconfig: Path) -> None:
    with running(served_config(enricher_kubeconfig)) as svc:
        stop = threading.Event()
        scrapes: list[int] = []

        def scrape() -> None:
            while not stop.is_set():
                scrapes.append(get(f"http://127.0.0.1:{svc.ports['metrics']}/metrics")[0])

        storm = [threading.Thread(target=scrape, name=f"scraper-{i}") for i in range(8)]
        began = time.monotonic()
        for thread in storm:
            thread.start()
        try:
            for i in range(40):  # every request answered while the storm goes on
                send(svc.ports["http"], [(WEB, CACHE, 1_000 + i, RUN_START_NS)], RUN_START_NS + i)
        finally:
            stop.set()
            for thread in storm:
                thread.join(30)
        elapsed = time.monotonic() - began
        assert scrapes and set(scrapes) == {200}
        assert svc.exposition.rebuilds <= elapsed + 2  # one rebuild a second, however many scrapes


def cache_resets(port: int) -> dict[str, float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        sample.labels[schema.ENRICHER_CACHE_LABEL]: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == schema.ENRICHER_CACHE_RESETS + "_total"
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
