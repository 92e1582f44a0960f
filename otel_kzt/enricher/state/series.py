"""Per-series state of the core: the cached resolution, the counting rule's runs, and tombstones.

A series is one (resource, metric, data-point attributes) combination. Its key is the serialised data point
minus the leading start/time/value fields, so it costs one slice. What is new in a point is decided by the
counting rule (counting.py, whose per-series state `Series` carries); increments are added to the
series' `acc` on the hot path and folded into the aggregate counters (prometheus.Aggregates) only when
/metrics is built, a checkpoint taken or the table swept: per point that is one addition. Series with the
same targets (Aggregates shares one tuple per distinct set: thousands of series feed one workload's
counters) share one accumulator, so a fold costs per target set, not per series (200k series: 53.5k sets).

A series silent for the TTL is forgotten, but leaves a tombstone (its runs and when it was forgotten,
bounded by count and by the lateness), so a return continues its runs instead of counting them again;
a tombstone given up raises the rule's floor, so whatever comes back from before it is a baseline.

A series' naming holds for the measurement times of its `Resolved` window; a point measured outside it (an
address reused while the point was on its way) is named again. Replaced namings are kept aside (`spare`,
with the generation they were valid in), so a series whose points alternate across a reuse swaps namings
instead of resolving again each time. A new naming is a new stream downstream: the run it renames goes
on from where it was (`out_*`: its points are re-exported with the rename as their start and the value
counted so far taken off), so re-exported cumulative streams stay valid.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

from otel_kzt.enricher.exporters.prometheus import Aggregates, Target
from otel_kzt.enricher.processing import native
from otel_kzt.enricher.processing.flowlogs import FlowTemplate
from otel_kzt.enricher.processing.protowire import varint
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.enricher.state.counting import Counted, Rule
from otel_kzt.schema import TrafficClass

log = logging.getLogger(__name__)

# NumberDataPoint fields 2 (start), 3 (time), 4 (as_double) / 6 (as_int) are 1 tag byte + 8 fixed bytes
# each. Encoders that write fields in number order (upb, Go, Java) put them first: after these 27 bytes
# come the attributes (and flags), which name the series.
CANONICAL_PREFIX: Final = 27
CANONICAL_POINT: Final = struct.Struct("<BQBQBq")  # tag, start, tag, time, tag, as_int: those 27 bytes
POINT_TAG: Final = 0x0A  # Sum.data_points: field 1, length-delimited
_CAP_LOG_EVERY_S: Final = 60.0
_MAX_SPARE: Final = 3  # namings kept aside per series (an address reused more often falls back to resolve)
# Restored series are resolved again on their next point: this generation never matches.
RESTORED_GENERATION: Final = -2
# A downstream stream's continuation: (run start it applies to, start re-exported, value taken off)
Stream = tuple[int, int, float]
# A forgotten series: (forgotten at, ns; its runs as Counted.runs(); Counted.dropped)
Tombstone = tuple[int, list[list[float]], int]
GroupKey = tuple[bytes, str]
_NS_MIN, _NS_MAX = -(1 << 63), 1 << 64  # beyond any time_unix_nano: an unbounded window
_INFINITE: Final = (-math.inf, math.inf)
# Sum.data_points tag and length of an enriched point, and the size (header + point), by its length: one
# bytes and one int object per length, shared by the series of that length (most series of a cluster have
# one of a few), kept for the lengths that take two varint bytes or fewer (at most 16,384); the received
# points' lengths likewise (an int above 256 is an object of its own: 200k series, 2 ints each)
_HEADERS: dict[int, tuple[bytes, int]] = {}
_POINT_LENS: dict[int, int] = {}
_CACHED_HEADERS: Final = 0x4000


def identity_key(dp: NumberDataPoint) -> bytes:
    """The series key of a decoded point: its attributes and flags in protobuf field order (what follows
    the 27-byte prefix of a canonical point, so both paths agree)."""
    ident = NumberDataPoint(flags=dp.flags)
    ident.attributes.extend(dp.attributes)
    return bytes(ident.SerializeToString())


def series_key(raw: bytes) -> bytes:
    """The series key of an encoded point, whatever its field order."""
    return identity_key(NumberDataPoint.FromString(raw))


@dataclass(frozen=True, slots=True)
class Naming:
    """One resolution of a series and what hangs off it."""

    resolved: Resolved
    targets: tuple[Target, ...]
    template: FlowTemplate | None
    stream: Stream | None = None  # set when kept aside: its downstream stream, to go on with

    def holds(self, at_ns: int) -> bool:
        return self.resolved.valid_from * 1e9 <= at_ns < self.resolved.valid_until * 1e9


@dataclass(slots=True)
class Series(Counted):
    generation: int
    resolved: Resolved
    targets: tuple[Target, ...]  # empty: over the series cap, enriched but not aggregated
    template: FlowTemplate | None  # set for billed classes (flow logs)
    header: bytes = b""  # Sum.data_points tag + length of the enriched point
    size: int = 0  # len(header) + the enriched point's length
    point_len: int = -1  # length of the received point these were computed for
    plain_len: int = -1  # point_len while no run is renamed downstream (-1 then: the hot loop checks)
    seen: float = 0.0
    out_run: int = -1  # the run whose points are re-exported as a renamed stream (-1: none)
    out_start: int = 0  # ... with this start time (the rename)
    out_offset: float = 0.0  # ... and this much taken off their values (counted before the rename)
    # increments not yet folded into the aggregates, shared by the series of the same targets
    # (SeriesTable.aim sets it; an unaimed series fails loudly instead of losing what it counts)
    acc: list[float] = field(default_factory=list)
    valid_from: int = _NS_MIN  # time_unix_nano window [from, until) `resolved` holds for (ints compare
    valid_until: int = _NS_MAX  # faster with the points' integer times than floats)
    spare: list[tuple[int, Naming]] | None = None  # replaced namings and their generation (see docstring)

    def __post_init__(self) -> None:
        self.set_window()

    def set_window(self) -> None:
        lo, hi = self.resolved.valid_from, self.resolved.valid_until  # unbounded: an infinite end
        self.valid_from = _NS_MIN if lo in _INFINITE else int(lo * 1e9)
        self.valid_until = _NS_MAX if hi in _INFINITE else int(hi * 1e9)

    def set_point_len(self, point_len: int) -> None:
        """Canonical points of one series all have the same length: the header is computed once."""
        enriched = point_len + len(self.resolved.extra)
        self.header, self.size = _HEADERS.get(enriched) or _header(enriched)
        self.point_len = point_len = _POINT_LENS.get(point_len) or _point_len(point_len)
        self.plain_len = point_len if self.out_run < 0 else -1

    def set_stream(self, stream: Stream) -> None:
        """Re-export the run `stream[0]` as a stream of its own (a rename), or nothing (-1)."""
        self.out_run, self.out_start, self.out_offset = stream
        self.plain_len = self.point_len if self.out_run < 0 else -1


# A new series made in C when built (_native_new.c `copied`): the slots of a prototype the dataclass made
# (its defaults stay the statement), these set to the new series' own (its accumulator a list of its own,
# as the default factory gives it), then the same window and header calls as `Series` makes
_FRESH_SLOTS: Final = ("generation", "resolved", "targets", "template", "acc")
_COPIED = None if native.MODULE is None else native.MODULE.copied
_FRESH: Final = () if native.MODULE is None else native.MODULE.slots_of(Series, _FRESH_SLOTS)
_PROTOTYPE: Final = Series(0, Resolved(b"", {}, TrafficClass.UNKNOWN, None), (), None)


def new_series(
    generation: int,
    resolved: Resolved,
    targets: tuple[Target, ...],
    template: FlowTemplate | None,
    point_len: int,
    *,
    native_path: bool = True,
) -> Series:
    """A new series of a received point of `point_len` bytes: `Series(...)` then its `set_point_len`. The
    dataclass's __init__ is skipped when the C extension is built and `native_path` (False: the statement,
    for the tests)."""
    if _COPIED is None or not native_path:
        made = Series(generation, resolved, targets, template)
    else:
        made = _COPIED(_PROTOTYPE, _FRESH, (generation, resolved, targets, template, []))
        made.set_window()
    made.set_point_len(point_len)
    return made


def _header(enriched: int) -> tuple[bytes, int]:
    header = bytes((POINT_TAG,)) + varint(enriched)
    made = header, len(header) + enriched
    if enriched < _CACHED_HEADERS:
        _HEADERS[enriched] = made
    return made


def _point_len(point_len: int) -> int:
    if point_len < _CACHED_HEADERS:
        _POINT_LENS[point_len] = point_len
    return point_len


class SeriesTable:
    """(resource bytes, metric) -> series key -> Series, with a cap, a TTL and tombstones. Caller holds
    the lock."""

    def __init__(
        self,
        aggregates: Aggregates,
        rule: Rule,
        *,
        max_series: int,
        ttl_s: float,
        max_tombstones: int,
        on_drop: Callable[[], None],
    ) -> None:
        self._agg, self.rule = aggregates, rule
        self.max_series, self.ttl_s, self.max_tombstones = max_series, ttl_s, max_tombstones
        self.groups: dict[GroupKey, dict[bytes, Series]] = {}
        self.count = 0
        # forgotten series, oldest first (insertion order is forgetting order)
        self.tombstones: dict[tuple[GroupKey, bytes], Tombstone] = {}
        self.tombstones_evicted = 0
        self._on_drop = on_drop
        self._last_cap_log = -_CAP_LOG_EVERY_S
        # id(targets) -> (targets, its pending increments): the accumulators series share (see the top)
        self._pending: dict[int, tuple[tuple[Target, ...], list[float]]] = {}
        self._last_sweep: float | None = None
        # moves whenever series are forgotten or replaced: what holds series (processing/repeats.py
        # layouts) is valid only in the epoch it was made in
        self.epoch = 0

    def take_evicted(self) -> dict[str, int]:
        """Counting state given up to a cap since the last call, by kind (`run`, `tombstone`)."""
        out = {"run": self.rule.runs_evicted, "tombstone": self.tombstones_evicted}
        self.rule.runs_evicted = self.tombstones_evicted = 0
        return {k: n for k, n in out.items() if n}

    def aim(self, entry: Series, targets: tuple[Target, ...]) -> None:
        """Point a series' increments at `targets` (through their shared accumulator)."""
        pending = self._pending.get(id(targets))
        if pending is None or pending[0] is not targets:
            pending = self._pending[id(targets)] = (targets, [0.0])
        entry.targets, entry.acc = targets, pending[1]

    def group(self, resource: bytes, metric: str) -> dict[bytes, Series]:
        return self.groups.setdefault((resource, metric), {})

    def admit(self, where: GroupKey, key: bytes, entry: Series, now: float) -> Series:
        """Track a new series (continuing its tombstone's runs, if it has one), or hand it back untracked
        (no targets) when the cap is reached."""
        if self.count >= self.max_series:
            self._on_drop()
            if now - self._last_cap_log >= _CAP_LOG_EVERY_S:
                self._last_cap_log = now
                log.warning(
                    "series cap reached: max_series=%d; new series are not aggregated", self.max_series
                )
            self.aim(entry, ())
            return entry
        self.aim(entry, entry.targets)
        tomb = self.tombstones.pop((where, key), None) if self.tombstones else None
        if tomb is None:
            entry.horizon = self.rule.horizon_ns
        else:
            forgotten, runs, dropped = tomb
            entry.set_runs(runs)
            entry.dropped, entry.horizon = dropped, forgotten
        group = self.groups.get(where)
        if group is None:
            group = self.groups[where] = {}
        group[key] = entry
        self.count += 1
        return entry

    def bury(self, where: GroupKey, key: bytes, runs: list[list[float]], dropped: int, at_ns: int) -> None:
        """Leave a tombstone; beyond the cap the oldest is given up (and the rule's floor raised)."""
        if runs or dropped >= 0:
            self.tombstones[(where, key)] = (at_ns, runs, dropped)
            if len(self.tombstones) > self.max_tombstones:
                self._give_up(next(iter(self.tombstones)))
                self.tombstones_evicted += 1

    def _give_up(self, tomb_key: tuple[GroupKey, bytes]) -> None:
        forgotten = self.tombstones.pop(tomb_key)[0]
        self.rule.floor_ns = max(self.rule.floor_ns, forgotten)

    def relabel(self, entry: Series, naming: Naming, generation: int) -> None:
        """Another naming (metadata changed, or a point measured across an address reuse): what was
        counted so far stays with the old labels, the old naming is kept aside, and downstream the current
        run goes on as a new stream (or as the stream the kept naming had)."""
        if entry.generation != RESTORED_GENERATION:  # a restored series' first naming is no rename
            stream = (entry.out_run, entry.out_start, entry.out_offset)
            spare = [s for s in entry.spare or () if s[1].resolved.basis != naming.resolved.basis]
            spare.insert(0, (entry.generation, Naming(entry.resolved, entry.targets, entry.template, stream)))
            del spare[_MAX_SPARE:]
            entry.spare = spare
            if naming.stream is not None:
                entry.set_stream(naming.stream)
            elif entry.start >= 0:  # starts 1 ns after the run's last point: never a run's own start
                entry.set_stream((entry.start, entry.last_time + 1, entry.last))
        entry.generation, entry.resolved = generation, naming.resolved
        self.aim(entry, naming.targets)  # what it counted so far stays pending for the old targets
        entry.template = naming.template
        entry.set_window()

    def fold_all(self) -> None:
        """Move every pending increment into the aggregates (caller holds the lock)."""
        for targets, acc in self._pending.values():
            total = acc[0]
            if total:
                for totals, labels, factor in targets:
                    totals[labels] = totals.get(labels, 0.0) + total * factor
                acc[0] = 0.0

    def maybe_sweep(self, now: float) -> None:
        """Forget series silent for longer than the TTL (leaving tombstones), give up runs and tombstones
        older than the lateness, and drop aggregates no live series feeds."""
        if self._last_sweep is None:
            self._last_sweep = now
        if now - self._last_sweep < min(self.ttl_s / 4, 30.0):
            return
        self._last_sweep = now
        self.epoch += 1
        self.fold_all()  # forgotten series' increments too, before `retain` judges what is fed
        cutoff, now_ns, rule = now - self.ttl_s, int(now * 1e9), self.rule
        live: list[tuple[Target, ...]] = []
        for group_key, table in list(self.groups.items()):
            for key in [k for k, s in table.items() if s.seen < cutoff]:
                gone = table.pop(key)
                self.count -= 1
                self.bury(group_key, key, gone.runs(), gone.dropped, now_ns)
            if not table:
                del self.groups[group_key]
            for s in table.values():
                live.append(s.targets)
                if s.older:
                    rule.expire(s, now)
                if s.spare:  # a naming kept aside may take over again: its aggregates stay meanwhile
                    live.extend(n.targets for _, n in s.spare)
        oldest = now_ns - int(rule.lateness_s * 1e9)
        while self.tombstones:
            first = next(iter(self.tombstones))
            if self.tombstones[first][0] >= oldest:
                break
            self._give_up(first)
        fed = {id(t) for t in live}  # accumulators of targets no series has any more go (all folded)
        self._pending = {i: p for i, p in self._pending.items() if i in fed}
        self._agg.retain(live, now, self.ttl_s)
