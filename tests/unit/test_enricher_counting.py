"""The counting rule (DESIGN §4) through the real core: the delivery patterns that once counted bytes twice,
baselines, tombstones, what is declined and why, renamed streams downstream, and restarts with a state file.

Times: the enricher's clock is in seconds (`now`), points carry nanoseconds; `ns(s)` converts.
"""

from __future__ import annotations

from otel_kzt import schema
from otel_kzt.enricher.state.checkpoint_format import decode, encode
from otel_kzt.enricher.state.counting import DEFAULT_MAX_RUNS
from tests.unit.test_enricher_core import FakeIndex, ListSink, forwarded, make_core, request

WEB, DB, API, CACHE = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"
POD_BYTES = schema.PROM_POD_CROSS_ZONE_BYTES + "_total"


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


class World:
    """A core started at `started` s (100) on a settable clock, and what it exposes."""

    def __init__(self, index: FakeIndex | None = None, started: float = 100.0, **kw: object) -> None:
        self.now = [started]
        self.index = index or FakeIndex()
        self.core, self.agg, self.registry, self.sink = make_core(self.index, clock=lambda: self.now[0], **kw)

    def send(self, points: list[tuple[str, str, int, float]], at: float, **extra: str) -> None:
        """Bytes points (src, dst, value, start in s) measured at `at` s, received at `at` + 1 s."""
        self.now[0] = max(self.now[0], at + 1)
        flows = [(s, d, v, ns(start)) for s, d, v, start in points]
        self.core.consume_metrics(request(flows, t=ns(at), **extra))

    def pod(self, pod: str = "web-1") -> float:
        return self.registry.get_sample_value(POD_BYTES, {"namespace": "shop", "pod": pod}) or 0.0

    def declined(self, reason: str) -> float:
        name = schema.ENRICHER_NOT_COUNTED + "_total"
        value = self.registry.get_sample_value(name, {schema.ENRICHER_NOT_COUNTED_REASON_LABEL: reason})
        assert value is not None, "every reason is exported from the start"
        return value


def forwarded_points(sink: ListSink) -> list[tuple[int, int]]:
    """(start, value) of every point in the last request sent downstream."""
    out = forwarded(sink).resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
    return [(dp.start_time_unix_nano, dp.as_int) for dp in out]


def test_flow_restart_with_its_final_sent_beside_the_new_flow() -> None:
    """Run 1 (from 110 s) is idle-evicted at 1,000 and the same key starts run 2 (from 150 s); the agent
    sends the final beside the new flow, the new flow first: true total 1,000 + 500."""
    w = World()
    w.send([(WEB, CACHE, 500, 110)], at=120)
    w.send([(WEB, CACHE, 200, 150), (WEB, CACHE, 1_000, 110)], at=155)
    w.send([(WEB, CACHE, 500, 150)], at=165)
    assert w.pod() == 1_500  # was 2,800
    assert sum(w.declined(r) for r in schema.NOT_COUNTED_REASONS) == 0


def test_final_re_sent_after_a_partly_failed_export_counts_once() -> None:
    w = World()
    w.send([(WEB, CACHE, 500, 110)], at=120)
    for _ in range(2):  # the agent retries the whole request: the final and the new run's first point
        w.send([(WEB, CACHE, 1_000, 110), (WEB, CACHE, 200, 150)], at=155)
    assert forwarded_points(w.sink) == []  # the retry's points went downstream the first time
    w.send([(WEB, CACHE, 1_000, 110)], at=155)  # and the final once more, on its own
    w.send([(WEB, CACHE, 500, 150)], at=165)
    assert w.pod() == 1_500
    assert w.declined(schema.NOT_COUNTED_DUPLICATE) == 3


def test_late_point_from_before_a_restart_adds_nothing() -> None:
    """Run 1 reaches 600, the agent restarts (run 2 at 300); a queued older point of run 1 (500) arrives:
    true total 600 + 300."""
    w = World()
    w.send([(WEB, CACHE, 400, 110)], at=120)
    w.send([(WEB, CACHE, 600, 110)], at=130)
    w.send([(WEB, CACHE, 300, 140)], at=145)
    w.send([(WEB, CACHE, 500, 110)], at=125)
    assert w.pod() == 900  # was 1,550
    assert w.declined(schema.NOT_COUNTED_STALE) == 1
    assert forwarded_points(w.sink) == []  # out of order in its stream: not re-exported either


def test_run_beyond_the_lateness_is_declined_as_late() -> None:
    w = World(series_ttl_s=60.0, lateness_s=60.0)
    w.send([(WEB, CACHE, 600, 110)], at=120)
    w.send([(WEB, CACHE, 300, 140)], at=145)
    for at in range(150, 300, 10):  # run 2 goes on; run 1 is untouched for longer than the lateness
        w.send([(WEB, CACHE, 300 + at, 140)], at=at)
    w.send([(WEB, CACHE, 650, 110)], at=121)  # run 1's final, very late: its run is no longer kept
    assert w.pod() == 600 + 300 + 290
    assert w.declined(schema.NOT_COUNTED_LATE_RUN) == 1
    w.send([(WEB, CACHE, 70, 100)], at=122)  # an even older run, never seen: may have been given up too
    assert w.declined(schema.NOT_COUNTED_LATE_RUN) == 2


def test_runs_beyond_the_cap_are_given_up_counted_and_their_late_points_declined() -> None:
    """A series keeps its newest run and DEFAULT_MAX_RUNS older ones (flows restarting faster than the
    lateness bound): the oldest beyond is given up, counted in counting_state_evicted{state="run"}, and its
    late final is declined as `late_run` instead of being counted whole again."""
    w = World(lateness_s=3600.0)
    starts = [110 + 10 * i for i in range(DEFAULT_MAX_RUNS + 2)]  # six runs, one after another
    for i, start in enumerate(starts):
        w.send([(WEB, CACHE, 100, start)], at=start + 5)
        evicted = w.registry.get_sample_value(
            schema.ENRICHER_COUNTING_EVICTED + "_total", {schema.ENRICHER_COUNTING_STATE_LABEL: "run"}
        )
        assert evicted == max(0, i - DEFAULT_MAX_RUNS)
    assert w.pod() == 100 * len(starts)
    w.send([(WEB, CACHE, 150, starts[0])], at=starts[0] + 6)  # the first run's final: given up
    assert w.pod() == 100 * len(starts) and w.declined(schema.NOT_COUNTED_LATE_RUN) == 1
    w.send([(WEB, CACHE, 150, starts[1])], at=starts[1] + 6)  # the second is still kept: +50
    assert w.pod() == 100 * len(starts) + 50


def test_series_forgotten_while_its_pods_other_series_live_comes_back_continued() -> None:
    """web -> cache on :443 goes quiet past the TTL (the agent keeps it, idle) while web -> cache on :80
    keeps the pod's counter alive; :443 comes back on the same run at 10,158: true 10,158 for it."""
    w = World(series_ttl_s=60.0, lateness_s=600.0)
    w.send([(WEB, CACHE, 10_000, 110)], at=120, **{schema.DESTINATION_PORT: "443"})
    for at in range(130, 400, 10):
        w.send([(WEB, CACHE, at, 110)], at=at, **{schema.DESTINATION_PORT: "80"})
    assert w.core.active_series == 1  # :443 is forgotten (a tombstone remembers its run)
    w.send([(WEB, CACHE, 10_158, 110)], at=400, **{schema.DESTINATION_PORT: "443"})
    assert w.pod() == 10_158 + 390  # was 20,158 + 390
    assert sum(w.declined(r) for r in schema.NOT_COUNTED_REASONS) == 0


def test_runs_from_before_the_enrichers_start_are_baselines() -> None:
    w = World()  # started at 100 s
    w.send([(WEB, CACHE, 700, 50)], at=110)  # began before: its 700 may have been counted elsewhere
    assert w.pod() == 0 and w.declined(schema.NOT_COUNTED_BASELINE) == 1
    assert forwarded_points(w.sink) == [(ns(50), 700)]  # downstream judges its own baselines
    w.send([(WEB, CACHE, 900, 50)], at=120)
    assert w.pod() == 200
    w.send([(WEB, CACHE, 40, 130)], at=135)  # the agent restarted after we started: counted whole
    assert w.pod() == 240
    w.send([(WEB, CACHE, 5, 0)], at=136, **{schema.DESTINATION_PORT: "53"})  # no start time: a baseline
    assert w.pod() == 240 and w.declined(schema.NOT_COUNTED_BASELINE) == 2


def test_tombstones_are_capped_and_counted_and_a_given_up_one_returns_as_a_baseline() -> None:
    w = World(series_ttl_s=60.0, lateness_s=600.0, max_tombstones=1)
    w.send([(WEB, CACHE, 1_000, 110)], at=120)
    w.send([(DB, CACHE, 2_000, 110)], at=200)
    w.send([(API, CACHE, 10, 110)], at=300)  # both above forgotten, in order: web's tombstone given up
    evicted = w.registry.get_sample_value(
        schema.ENRICHER_COUNTING_EVICTED + "_total", {schema.ENRICHER_COUNTING_STATE_LABEL: "tombstone"}
    )
    assert evicted == 1
    w.send([(WEB, CACHE, 1_100, 110)], at=310)  # from before it was forgotten: a baseline, not 1,100
    w.send([(DB, CACHE, 2_500, 110)], at=310)  # db's tombstone is kept: +500
    assert w.declined(schema.NOT_COUNTED_BASELINE) == 1 and w.pod("db-0") == 2_500
    assert w.pod("web-1") == 0  # its counter, fed by no series for the TTL, went (a reset to Prometheus)
    w.send([(WEB, CACHE, 30, 305)], at=311)  # web's agent restarted after that: a new run, counted whole
    assert w.pod("web-1") == 30


def test_rejected_points_are_declined_too() -> None:
    w = World()
    w.send([(WEB, CACHE, -5, 110), (WEB, "", 3, 110), (WEB, CACHE, 7, 110)], at=120)
    assert w.declined(schema.NOT_COUNTED_REJECTED) == 2 and w.pod() == 7


def test_series_renamed_by_the_enricher_is_a_new_stream_downstream() -> None:
    """cache-1 moves from zone-b to zone-a: web -> cache's enriched attributes change, so downstream it is
    another stream; it starts 1 ns after the last point before the rename, with what came since (not the
    whole 1,000 again)."""
    index = FakeIndex()
    w = World(index)
    w.send([(WEB, CACHE, 1_000, 110)], at=120)
    assert forwarded_points(w.sink) == [(ns(110), 1_000)]
    index.pods[CACHE] = index.pods[API]  # same zone now
    index.gen += 1
    w.send([(WEB, CACHE, 1_500, 110)], at=130)
    assert forwarded_points(w.sink) == [(ns(120) + 1, 500)]
    w.send([(WEB, CACHE, 1_700, 110)], at=140)
    assert forwarded_points(w.sink) == [(ns(120) + 1, 700)]
    w.send([(WEB, CACHE, 20, 150)], at=155)  # the agent restarts the flow: a run of its own, as sent
    assert forwarded_points(w.sink) == [(ns(150), 20)]
    zones = w.agg.snapshot()["zone_bytes"]
    assert zones == {("zone-a", "zone-b"): 1_000, ("zone-a", "zone-a"): 720}


def restart(w: World, *, state: bool, at: float) -> World:
    """A new enricher process started at `at` s, from `w`'s checkpoint (or without one)."""
    data = encode(w.core.capture_state())
    new = World(w.index, started=at, series_ttl_s=60.0, lateness_s=600.0)
    if state:
        new.core.restore_state(decode(data, frozenset(new.agg.families())))
    return new


def test_a_restart_with_the_state_file_keeps_the_rule() -> None:
    w = World(series_ttl_s=60.0, lateness_s=600.0)
    w.send([(WEB, CACHE, 500, 110)], at=120)
    w.send([(WEB, CACHE, 200, 150)], at=155)  # run 2 began; run 1's final is still on its way
    w.send([(DB, CACHE, 4_000, 110)], at=121)
    for at in range(160, 260, 10):
        w.send([(WEB, CACHE, 200 + at, 150)], at=at)  # db goes quiet: forgotten, a tombstone
    assert w.core.active_series == 1 and w.pod() == 500 + 450 and w.pod("db-0") == 4_000
    again = restart(w, state=True, at=300)
    assert again.pod() == 950 and again.pod("db-0") == 4_000  # restored before any report
    again.send([(WEB, CACHE, 1_000, 110)], at=301)  # run 1's final: its run came through the restart
    again.send([(DB, CACHE, 4_100, 110)], at=302)  # db returns: its tombstone came through too
    again.send([(API, CACHE, 80, 95)], at=303)  # began before the first start-up: still a baseline
    assert (again.pod(), again.pod("db-0"), again.pod("api-1")) == (1_450, 4_100, 0)
    assert again.declined(schema.NOT_COUNTED_BASELINE) == 1


def test_a_restart_without_the_state_file_counts_only_what_is_new() -> None:
    w = World()
    w.send([(WEB, CACHE, 500, 110)], at=120)
    fresh = restart(w, state=False, at=300)
    fresh.send([(WEB, CACHE, 800, 110)], at=301)  # a run from before this process: a baseline
    fresh.send([(WEB, CACHE, 900, 110)], at=311)
    fresh.send([(WEB, CACHE, 60, 305)], at=312, **{schema.DESTINATION_PORT: "80"})  # began after: whole
    assert fresh.pod() == 100 + 60
