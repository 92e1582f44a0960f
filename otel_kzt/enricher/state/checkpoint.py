"""The enricher's state checkpoint (`--state-file`): restarts that keep the counting rule.

The /metrics counters are sums of the increments of every series ever seen. A new process would start them
from zero and treat every run it meets as one it could not have seen (a baseline, DESIGN §4): Prometheus
sees a reset. So the enricher writes, every `--checkpoint-interval` and on shutdown, one snapshot taken
under the lock that updates both:

- the aggregated totals (and the agents' last report times),
- per series: identity -> its runs (start, last value, last time), the newest run given up, its horizon,
  last seen, its downstream stream (a rename), and the totals it adds to,
- the tombstones of forgotten series, and the rule's start-up and floor ("could have seen" times).

Restored from the same instant, the next cumulative value of a series adds exactly what came since the
checkpoint, so totals stay exact even after SIGKILL with a stale file (/metrics serves what was written:
nothing counted after it was ever shown). Restored series are re-resolved against the new process'
metadata on their next point (their increments then go where that says).

The series are held as columns (one list per field): the copy under the lock is one flat list, cut into
columns by slicing, and the file format (checkpoint_format.py) writes the columns as they are.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from otel_kzt.enricher.exporters.prometheus import Aggregates, Totals
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.enricher.state.series import RESTORED_GENERATION, GroupKey, Series, SeriesTable
from otel_kzt.schema import TrafficClass

log = logging.getLogger(__name__)

_RESTORED = Resolved(b"", {}, TrafficClass.UNKNOWN, None, basis=("restored",))

# (family name, label tuple, factor): a series' target without the dict it points at
PlainTarget = tuple[str, tuple[str, ...], float]
Runs = list[list[float]]  # [start, last, last_time, touched] (Counted.runs)
# group, series key, forgotten at (ns), runs, dropped
TombState = tuple[GroupKey, bytes, int, Runs, int]
COLUMNS: Final = (
    "key",
    "start",
    "last",
    "last_time",
    "older",
    "dropped",
    "horizon",
    "seen",
    "out_run",
    "out_start",
    "out_offset",
    "targets",
)


class StateError(ValueError):
    """A checkpoint that cannot be used (corrupt, truncated, another version or aggregation)."""


@dataclass(slots=True)
class SeriesColumns:
    """The tracked series, one list per Series field (COLUMNS), rows in group order."""

    groups: list[tuple[GroupKey, int]] = field(default_factory=list)  # each group and its number of rows
    key: list[bytes] = field(default_factory=list)
    start: list[int] = field(default_factory=list)  # the newest run: start, last value, last time
    last: list[float] = field(default_factory=list)
    last_time: list[int] = field(default_factory=list)
    older: list[Runs | None] = field(default_factory=list)  # the other kept runs
    dropped: list[int] = field(default_factory=list)
    horizon: list[int] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)
    out_run: list[int] = field(default_factory=list)  # a renamed downstream stream (-1: none)
    out_start: list[int] = field(default_factory=list)
    out_offset: list[float] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # index into State.target_sets

    def __len__(self) -> int:
        return len(self.key)

    def group_of_rows(self) -> list[GroupKey]:
        out: list[GroupKey] = []
        for group, n in self.groups:
            out += [group] * n
        return out


@dataclass(slots=True)
class State:
    flow_labels: tuple[str, ...]
    totals: dict[str, Totals]
    agents: dict[str, float]
    series: SeriesColumns = field(default_factory=SeriesColumns)
    written: float = 0.0
    startup_ns: int | None = None  # the rule's start-up (None: a version 1 file; the new process' own)
    floor_ns: int = 0
    tombstones: list[TombState] = field(default_factory=list)
    target_sets: list[tuple[PlainTarget, ...]] = field(default_factory=list)  # shared by series


@contextmanager
def gc_paused() -> Iterator[None]:
    """No collection while ~a million references are copied (a full collection at 100k series takes
    longer than the copy itself); the checkpoint's writes never overlap, so this does not nest."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def capture(agg: Aggregates, table: SeriesTable, now: float | None = None) -> State:
    """Copy what a restart needs in one instant (takes `agg.lock`, briefly: one flat list).

    Pending increments are folded first, so the totals and the series' runs describe the same instant.
    Targets are turned into family names outside the lock: the dicts they point at and their label tuples
    never change identity."""
    flat: list[Any] = []
    groups: list[tuple[GroupKey, int]] = []
    width = len(COLUMNS)
    with gc_paused():
        with agg.lock:
            table.fold_all()
            for group, entries in table.groups.items():
                before = len(flat)
                for key, s in entries.items():
                    if s.start >= 0:  # admitted but never counted (its value was rejected): nothing to carry
                        older = [list(r) for r in s.older] if s.older else None  # runs change in place
                        flat += (key, s.start, s.last, s.last_time, older, s.dropped, s.horizon, s.seen)
                        flat += (s.out_run, s.out_start, s.out_offset, s.targets)
                groups.append((group, (len(flat) - before) // width))
            tombs = list(table.tombstones.items())  # tombstones are never changed, only replaced
            totals = {name: dict(d) for name, d in agg.families().items()}
            agents = dict(agg.agent_last_report)
            startup, floor = table.rule.startup_ns, table.rule.floor_ns
        columns = [flat[i::width] for i in range(width)]
        names = {id(d): name for name, d in agg.families().items()}
        index: dict[int, int] = {}  # series share targets tuples (Aggregates.targets): few distinct ones
        target_sets: list[tuple[PlainTarget, ...]] = []
        for targets in columns[-1]:
            if id(targets) not in index:
                index[id(targets)] = len(target_sets)
                target_sets.append(tuple((names[id(d)], k, f) for d, k, f in targets))
        columns[-1] = [index[id(targets)] for targets in columns[-1]]
        series = SeriesColumns(groups, *columns)
        tombstones = [(group, key, at, runs, dropped) for (group, key), (at, runs, dropped) in tombs]
    return State(
        agg.flow_labels,
        totals,
        agents,
        series,
        time.time() if now is None else now,
        startup,
        floor,
        tombstones,
        target_sets,
    )


def apply(state: State, agg: Aggregates, table: SeriesTable, now: float) -> int:
    """Install a checkpoint into an empty core (caller holds `agg.lock`); returns the series restored.

    Series silent longer than the TTL, and beyond the cap the least recently seen, become tombstones."""
    if state.flow_labels != agg.flow_labels:
        # Other labels are other Prometheus series: restoring half (last values without totals) would lose
        # bytes, so nothing is restored.
        raise StateError(
            f"written for flow_aggregation {list(state.flow_labels)}, now {list(agg.flow_labels)}"
        )
    agg.load(state.totals, state.agents)
    rule = table.rule
    if state.startup_ns is not None:  # the chain's first start-up: what it could not see, neither can this
        rule.startup_ns = state.startup_ns
    rule.floor_ns = max(rule.floor_ns, state.floor_ns)
    for group, key, at, runs, dropped in sorted(state.tombstones, key=lambda tomb: tomb[2]):
        table.bury(group, key, runs, dropped, at)
    s = state.series
    ranked = sorted(range(len(s)), key=s.seen.__getitem__, reverse=True)
    live = [i for i in ranked if s.seen[i] >= now - table.ttl_s][: table.max_series]
    groups = s.group_of_rows()
    if len(live) < len(ranked):
        log.warning(
            "checkpoint: %d series silent past the TTL or over max_series=%d left as tombstones",
            len(ranked) - len(live),
            table.max_series,
        )
        # Forgotten as of the checkpoint: nothing it holds happened later, so a run that began after it
        # (its points counted by a process that died before the next checkpoint) counts again in full.
        kept, at_ns = set(live), int(min(now, state.written or now) * 1e9)
        for i in reversed(ranked):
            if i not in kept:
                runs = [[s.start[i], s.last[i], s.last_time[i], 0.0], *(s.older[i] or ())]
                table.bury(groups[i], s.key[i], runs, s.dropped[i], at_ns)
    families = agg.families()
    target_sets = [tuple((families[n], agg.intern(k), f) for n, k, f in p) for p in state.target_sets]
    for i in live:
        entry = Series(RESTORED_GENERATION, _RESTORED, (), None, seen=s.seen[i])
        table.aim(entry, target_sets[s.targets[i]])
        entry.start, entry.last, entry.last_time, entry.older = (
            s.start[i],
            s.last[i],
            s.last_time[i],
            s.older[i],
        )
        entry.dropped, entry.horizon = s.dropped[i], s.horizon[i]
        entry.set_stream((s.out_run[i], s.out_start[i], s.out_offset[i]))
        table.group(*groups[i])[s.key[i]] = entry
    table.count = sum(len(g) for g in table.groups.values())
    table.epoch += 1
    return len(live)
