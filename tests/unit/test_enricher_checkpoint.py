"""The state checkpoint: round trip, exact totals after a stale checkpoint, bad files ignored and counted,
TTL and cap on load, atomic periodic writes."""

from __future__ import annotations

import base64
import gzip
import json
import time
from pathlib import Path

import pytest
import zstandard
from prometheus_client import CollectorRegistry

from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Aggregates, HealthMetrics
from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.state.checkpoint import StateError, capture
from otel_kzt.enricher.state.checkpoint_format import VERSION, decode, encode
from otel_kzt.enricher.state.checkpointer import Checkpointer, write_atomic
from tests.unit.test_enricher_core import FakeIndex, make_core, request

WEB, API, CACHE, ETL, GOOGLE = "10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5", "8.8.8.8"
Made = tuple[Core, Aggregates, CollectorRegistry]


def core_at(now: list[float], **kw: object) -> Made:
    """A core whose clock reads `now[0]`; it started at 0 s, before every run these tests send."""
    at, now[0] = now[0], 0.0
    core, agg, registry, _ = make_core(FakeIndex(), clock=lambda: now[0], **kw)
    now[0] = at
    return core, agg, registry


def unpack(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data)


def families(agg: Aggregates) -> frozenset[str]:
    return frozenset(agg.families())


def feed(
    core: Core, web_cache: int, api_etl: int, web_google: float, *, start: int = 1, t: int = 2_000
) -> None:
    """Bytes and packets of three series (cross-zone, cross-region, external with a double value)."""
    points = [(WEB, CACHE, web_cache, start), (API, ETL, api_etl, 1), (WEB, GOOGLE, web_google, 1)]
    core.consume_metrics(request(points, t=t))
    core.consume_metrics(request([(p[0], p[1], p[2] // 100, p[3]) for p in points], schema.FLOW_PACKETS, t=t))


def totals(agg: Aggregates) -> dict[str, dict[tuple[str, ...], float]]:
    snap = agg.snapshot()
    del snap["agents"]
    return snap


def restored(data: bytes, now: list[float], **kw: object) -> Made:
    core, agg, registry = core_at(now, **kw)
    core.restore_state(decode(data, families(agg)))
    return core, agg, registry


def test_round_trip_keeps_totals_series_and_agents() -> None:
    now = [1000.0]
    core, agg, _ = core_at(now)
    feed(core, 1_000, 2_000, 3_000.5)
    state = core.capture_state()
    assert len(state.series) == 6  # 3 flows x bytes/packets
    back = decode(encode(state), families(agg))
    assert back == state
    core2, agg2, _ = restored(encode(state), now)
    assert totals(agg2) == totals(agg) and agg2.agent_last_report == agg.agent_last_report
    assert core2.active_series == 6
    assert sum(agg.cost.values()) > 0  # cost is among the restored totals
    # the same next cumulative values add the same increments in both
    feed(core, 1_500, 2_500, 4_000.25, t=3_000)
    feed(core2, 1_500, 2_500, 4_000.25, t=3_000)
    assert totals(agg2) == totals(agg)
    assert agg.snapshot()["pod_cross_zone"][("shop", "web-1")] == 1_500


def test_stale_checkpoint_then_new_cumulative_values_gives_exact_totals() -> None:
    """SIGKILL after a checkpoint: what was counted since is lost with the process, yet the next cumulative
    values bring the totals to exactly what a process that never stopped would show."""
    now = [1000.0]
    reference, ref_agg, _ = core_at(now)
    victim, _, _ = core_at(now)
    # web's agent restarts (new start time) before the checkpoint; the kill comes two reports after it
    steps = [(1_000, 2_000, 10.0, 1), (300, 3_000, 11.0, 7), (5_000, 4_000, 20.5, 7), (5_300, 4_500, 21.0, 7)]
    for i, (wc, ae, wg, start) in enumerate(steps):
        feed(reference, wc, ae, wg, start=start, t=2_000 + i)
        feed(victim, wc, ae, wg, start=start, t=2_000 + i)
        if i == 1:
            checkpoint = encode(victim.capture_state())
    survivor, agg, _ = restored(checkpoint, now)
    feed(reference, 6_000, 6_000, 30.0, start=7, t=2_010)
    feed(survivor, 6_000, 6_000, 30.0, start=7, t=2_010)
    assert totals(agg) == totals(ref_agg)
    # web -> cache: 1000 before its agent restarted + 6000 since; nothing counted twice or lost
    assert agg.snapshot()["pod_cross_zone"][("shop", "web-1")] == 1_000 + 6_000
    assert agg.snapshot()["zone_bytes"][("zone-a", "zone-c")] == 6_000  # api -> etl, cross-region


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\x01garbage",
        b'{"format": "otel-kzt-enricher-state", "version": 1, "labels": [',  # torn
        gzip.compress(b'{"format": "otel-kzt-enricher-state", "version": 1, "labels": ['),  # torn JSON
        gzip.compress(b"[1, 2]"),
        gzip.compress(json.dumps({"format": "otel-kzt-enricher-state", "version": VERSION + 1}).encode()),
        gzip.compress(json.dumps({"format": "something-else", "version": VERSION}).encode()),
        b"{}",  # plain JSON, not compressed
        zstandard.ZstdCompressor().compress(b'{"format": "otel-kzt-enricher-state", "version": 2, "ser')[:-3],
    ],
)
def test_corrupt_or_unknown_file_is_ignored_and_counted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    core, agg, _ = core_at([1000.0])
    health = HealthMetrics(CollectorRegistry())
    cp = Checkpointer(str(path), core, 10.0, health, families=families(agg))
    assert cp.load() == 0
    assert health.checkpoint_errors.labels("load")._value.get() == 1
    assert core.active_series == 0 and totals(agg) == totals(Aggregates(agg.flow_labels))


def test_bad_values_and_other_aggregation_are_refused() -> None:
    now = [1000.0]
    core, agg, _ = core_at(now)
    feed(core, 1_000, 2_000, 3.0)
    doc = json.loads(unpack(encode(core.capture_state())))
    doc["series"]["last"][0] = -5  # a negative last value
    with pytest.raises(StateError, match="non-negative"):
        decode(gzip.compress(json.dumps(doc).encode()), families(agg))
    doc = json.loads(unpack(encode(core.capture_state())))
    doc["series"]["targets"][0] = 999  # a target set that does not exist
    with pytest.raises(StateError, match="no entry 999"):
        decode(gzip.compress(json.dumps(doc).encode()), families(agg))
    state = decode(encode(core.capture_state()), families(agg))
    core2, agg2, _, _ = make_core(FakeIndex())
    agg2.flow_labels = (schema.SOURCE_NAMESPACE_NAME,)  # as if started with another --flow-aggregation
    with pytest.raises(StateError, match="flow_aggregation"):
        core2.restore_state(state)
    assert agg2.flow_bytes == {} and core2.active_series == 0


def test_ttl_and_cap_respected_on_load() -> None:
    now = [1000.0]
    core, _, _ = core_at(now, series_ttl_s=60.0)
    feed(core, 1_000, 2_000, 3.0)  # six series seen at 1000
    now[0] = 1050.0
    core.consume_metrics(request([(API, CACHE, 7, 1)], t=3_000))  # one more, seen at 1050
    data = encode(core.capture_state())
    now[0] = 1070.0  # the first six are 70s old: past the 60s TTL
    survivor, _, _ = restored(data, now, series_ttl_s=60.0)
    assert survivor.active_series == 1
    now[0] = 1040.0  # all within the TTL, but the cap is 4: the most recently seen are kept
    capped, agg, _ = restored(data, now, series_ttl_s=60.0, max_series=4)
    assert capped.active_series == 4
    kept = capture(agg, capped._table)  # the restored table itself
    assert max(kept.series.seen) == 1050.0
    # the restored series continue: 10 more bytes on api -> cache count 10, not 17
    capped.consume_metrics(request([(API, CACHE, 17, 1)], t=4_000))
    assert agg.snapshot()["zone_bytes"][("zone-a", "zone-b")] == 1_000 + 17  # web -> cache + api -> cache


def test_periodic_atomic_writes_and_final_write_on_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    core, agg, _ = core_at([1000.0])
    health = HealthMetrics(CollectorRegistry())
    cp = Checkpointer(str(path), core, 0.05, health, families=families(agg))
    cp.start()
    try:
        feed(core, 1_000, 2_000, 3.0)
        deadline = time.monotonic() + 5
        while not (path.exists() and decode(path.read_bytes(), families(agg)).series):
            assert time.monotonic() < deadline, "no periodic checkpoint"
            time.sleep(0.02)
    finally:
        feed(core, 4_000, 2_000, 3.0, t=3_000)
        cp.shutdown()
    assert decode(path.read_bytes(), families(agg)).totals["flow_bytes"] == agg.flow_bytes  # the final one
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left
    assert health.checkpoint_timestamp._value.get() > 0
    write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    core, agg, _ = core_at([1000.0])
    health = HealthMetrics(CollectorRegistry())
    cp = Checkpointer(
        str(tmp_path / "missing-dir" / "state.json"), core, 10.0, health, families=families(agg)
    )
    assert cp.save() is False
    assert health.checkpoint_errors.labels("write")._value.get() == 1


def test_restored_series_are_resolved_again_against_the_new_metadata() -> None:
    """Labels are not taken from the file: the new process' metadata decides where increments go."""
    now = [1000.0]
    core, _, _ = core_at(now)
    core.consume_metrics(request([(WEB, CACHE, 1_000, 1)]))
    # in the new process 10.0.0.4 is a same-zone pod: the next 500 bytes are same-zone, the 1000 stay
    moved = FakeIndex()
    moved.pods[CACHE] = moved.pods[API]
    survivor, agg2, _, _ = make_core(moved, clock=lambda: now[0])
    survivor.restore_state(decode(encode(core.capture_state()), families(agg2)))
    survivor.consume_metrics(request([(WEB, CACHE, 1_500, 1)], t=3_000))
    snap = agg2.snapshot()
    assert snap["zone_bytes"] == {("zone-a", "zone-b"): 1_000, ("zone-a", "zone-a"): 500}
    assert snap["pod_cross_zone"] == {("shop", "web-1"): 1_000}


def test_metrics_shows_the_last_checkpoint_written_and_a_scrape_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json.gz"
    core, agg, _ = core_at([1000.0])
    cp = Checkpointer(str(path), core, 3600.0, HealthMetrics(CollectorRegistry()), families=families(agg))
    feed(core, 1_000, 2_000, 3.0)
    assert not any(cp.persisted().values()) and not path.exists()  # nothing written yet: nothing shown
    assert cp.save()
    on_disk = decode(path.read_bytes(), families(agg))
    exposed = cp.persisted()
    assert {k: v for k, v in exposed.items() if k != "agents"} == on_disk.totals
    assert exposed["pod_cross_zone"] == {("shop", "web-1"): 1_000, ("shop", "api-1"): 2_000}
    assert exposed["agents"] == {("n-a1",): 1000.0}
    feed(core, 1_500, 2_000, 3.0, t=3_000)
    written = path.stat().st_mtime_ns
    assert cp.persisted()["pod_cross_zone"][("shop", "web-1")] == 1_000  # counted, not yet on disk
    assert path.stat().st_mtime_ns == written
    again = Checkpointer(
        str(path), core_at([1001.0])[0], 3600.0, HealthMetrics(CollectorRegistry()), families=families(agg)
    )
    again.load()  # a restarted process shows what its file holds before anything else arrives
    assert again.persisted() == exposed


def test_version_1_files_are_read() -> None:
    """Written before runs and tombstones: each series' one run goes on after the upgrade."""
    now = [1000.0]
    core, agg, _ = core_at(now)
    feed(core, 1_000, 2_000, 3.0)
    v2 = json.loads(unpack(encode(core.capture_state())))
    s = v2["series"]
    keys = s["keys"].encode("latin-1")
    offsets = [sum(s["key_lengths"][:i]) for i in range(len(s["key_lengths"]) + 1)]
    group_rows = [g for g, (_, _, n) in enumerate(s["groups"]) for _ in range(n)]
    v1 = {
        **{k: v2[k] for k in ("format", "written", "flow_labels", "labels", "totals", "agents", "targets")},
        "version": 1,
        "groups": [(r, m) for r, m, _ in s["groups"]],
        "series": [
            (
                g,
                base64.b64encode(keys[offsets[i] : offsets[i + 1]]).decode(),
                s["start"][i],
                s["last"][i],
                s["last_time"][i],
                s["seen"][i],
                s["targets"][i],
            )
            for i, g in enumerate(group_rows)
        ],
    }
    survivor, agg2, _ = restored(gzip.compress(json.dumps(v1).encode()), now)
    assert survivor.active_series == 6 and totals(agg2) == totals(agg)
    feed(survivor, 1_500, 2_000, 3.0, t=3_000)
    assert agg2.snapshot()["pod_cross_zone"][("shop", "web-1")] == 1_500
