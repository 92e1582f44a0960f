"""The counting rule (DESIGN §4, wave 2): which part of a cumulative point is new. Its one home.

A series (received attributes + resource; never the enriched ones) has runs, one per start time. Per run
the last cumulative value counted is kept; a point adds `value - last` when that is positive, else nothing
(a duplicate, a retry, a late or smaller value). A run not seen before counts its whole value only when it
started after the moment this enricher could have seen it (`Counted.horizon`: its own start-up, or when it
last forgot that series); otherwise it is a baseline. Older runs are kept for a bounded lateness, so an
evicted flow's final value that arrives after the next run began still adds its last increment; a run
given up leaves its start in `Counted.dropped`, so its late points are recognised and declined.

Both enrichment paths (the canonical fast path and the object path, processing/points.py) call
`Rule.count`; what it declines is tallied by reason for `kzt_enricher_points_not_counted_total`. This is
the rule's statement and its reference: the C extension's loop over a Sum read from its layout
(processing/_native.c, when built) takes only `count`'s first branch itself (the newest run, integers,
a grown value or an idle report) and hands every other point to `count`; a property test runs the core
with and without it on the same deliveries (tests/unit/test_enricher_native.py).
Re-export follows the rule too: what it declines as a duplicate, stale or late is not forwarded
(`NOT_FORWARDED`), so each run reaches downstream in order and once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from otel_kzt import schema

NOT_FORWARDED: Final = -1.0  # `count` result: declined and not forwarded (an increment is >= 0)
DEFAULT_LATENESS_S: Final = 3600.0  # runs and tombstones kept this long (an agent's outage, an idle flow)
DEFAULT_MAX_RUNS: Final = 4  # runs kept per series besides the newest (then the oldest is given up)

# An older run: [start, last, last_time, touched] (touched: enricher clock, seconds, for the lateness).
OlderRun = list[float]


@dataclass(slots=True, kw_only=True)
class Counted:
    """What the rule keeps per series: the newest run inline (the common case costs no lookup), the
    others in `older`."""

    start: int = -1  # the newest run's start time (ns); -1: nothing counted yet
    last: float = 0.0  # its last cumulative value
    last_time: int = 0  # its last point's time (ns)
    older: list[OlderRun] | None = None
    dropped: int = -1  # the newest start among runs given up: a point of a run at or before it is late
    horizon: int = 0  # a run starting at or before this (ns, enricher clock) may hold bytes counted before
    since: int = 0  # where the last increment's interval began (flow logs): the run's previous point or start

    def runs(self) -> list[list[float]]:
        """Every run as [start, last, last_time, touched], the newest first (checkpoints)."""
        head = [[self.start, self.last, self.last_time, 0.0]] if self.start >= 0 else []
        return head + [list(r) for r in self.older or ()]

    def set_runs(self, runs: list[list[float]]) -> None:
        """Install runs as `runs()` returns them."""
        if runs:
            start, last, last_time, _ = runs[0]
            self.start, self.last, self.last_time = int(start), last, int(last_time)
        self.older = [list(r) for r in runs[1:]] or None


class Rule:
    """The rule with its bounds, and the tally of what it declined (caller holds the aggregates lock)."""

    def __init__(self, lateness_s: float, startup_ns: int, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        self.lateness_s, self.max_runs = lateness_s, max_runs
        self.startup_ns = startup_ns  # this enricher's (or, restored, its checkpoint's) start-up
        self.floor_ns = 0  # raised when a tombstone is given up: its series' return is then a baseline
        self.declined: dict[str, int] = dict.fromkeys(schema.NOT_COUNTED_REASONS, 0)
        self.runs_evicted = 0

    @property
    def horizon_ns(self) -> int:
        """The horizon of a series this enricher has no memory of."""
        return max(self.startup_ns, self.floor_ns)

    def count(self, s: Counted, start: int, t: int, value: float, now: float) -> float:
        """The increment a point (run `start`, time `t` ns, cumulative `value`) adds; 0 when it adds
        nothing but goes on downstream, NOT_FORWARDED when it is declined and held back. Its first
        branch, for integers, is also written in processing/_native.c (`count_common`): change both."""
        if start == s.start:
            last = s.last
            if value > last:
                s.since = s.last_time
                s.last = value
                if t > s.last_time:  # noqa: PLR1730 (max() is a call: this runs per point)
                    s.last_time = t
                return value - last
            if value == last and t > s.last_time:  # an idle report: nothing new
                s.last_time = t
                return 0.0
            return self.decline(
                schema.NOT_COUNTED_DUPLICATE
                if value == last and t == s.last_time
                else schema.NOT_COUNTED_STALE
            )
        return self._other_run(s, start, t, value, now)

    def decline(self, reason: str, points: int = 1) -> float:
        self.declined[reason] += points
        return NOT_FORWARDED

    def take_declined(self) -> dict[str, int]:
        """The tally since the last call (the caller moves it into the Prometheus counters)."""
        out = {r: n for r, n in self.declined.items() if n}
        if out:
            self.declined = dict.fromkeys(schema.NOT_COUNTED_REASONS, 0)
        return out

    def _other_run(self, s: Counted, start: int, t: int, value: float, now: float) -> float:
        for run in s.older or ():
            if run[0] == start:
                run[3] = now
                last, last_time = run[1], run[2]
                if value > last:
                    run[1], run[2] = value, max(t, last_time)
                    s.since = int(last_time)
                    return value - last
                if value == last and t > last_time:
                    run[2] = t
                    return 0.0
                duplicate = value == last and t == last_time
                return self.decline(schema.NOT_COUNTED_DUPLICATE if duplicate else schema.NOT_COUNTED_STALE)
        if start <= s.dropped:
            return self.decline(schema.NOT_COUNTED_LATE_RUN)
        self._add_run(s, start, t, value, now)
        if start <= s.horizon:
            self.declined[schema.NOT_COUNTED_BASELINE] += 1
            return 0.0  # goes on downstream: its consumers judge their own baselines
        s.since = start
        return value

    def _add_run(self, s: Counted, start: int, t: int, value: float, now: float) -> None:
        if s.start < 0:
            s.start, s.last, s.last_time = start, value, t
            return
        older = s.older if s.older is not None else []
        if start > s.start:  # a newer run: the current one stays for late points of its own
            older.append([s.start, s.last, s.last_time, now])
            s.start, s.last, s.last_time = start, value, t
        else:  # an older run seen for the first time, after a newer one
            older.append([start, value, t, now])
        if len(older) > self.max_runs:
            oldest = min(range(len(older)), key=lambda i: older[i][0])
            self._give_up(s, older.pop(oldest))
            self.runs_evicted += 1
        s.older = older

    def expire(self, s: Counted, now: float) -> None:
        """Give up older runs untouched for the lateness bound (the sweep calls this)."""
        if not s.older:
            return
        cutoff = now - self.lateness_s
        kept = []
        for run in s.older:
            if run[3] < cutoff:
                self._give_up(s, run)
            else:
                kept.append(run)
        s.older = kept or None

    @staticmethod
    def _give_up(s: Counted, run: OlderRun) -> None:
        if run[0] > s.dropped:
            s.dropped = int(run[0])
