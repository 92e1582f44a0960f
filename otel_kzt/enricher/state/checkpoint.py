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

Format: gzipped JSON (version 2; version 1 files, without runs or tombstones, are still read) with
interned label tuples, target sets and groups; series keys in base64. The copy is taken under the lock;
encoding and the atomic write (temp + fsync + rename) happen outside.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from otel_kzt.enricher.exporters.prometheus import Aggregates, Totals
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.enricher.state.series import RESTORED_GENERATION, GroupKey, Series, SeriesTable, Stream
from otel_kzt.schema import TrafficClass

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT: Final = "otel-kzt-enricher-state"
VERSION: Final = 2
_READS: Final = (1, 2)
_RESTORED = Resolved(b"", {}, TrafficClass.UNKNOWN, None, basis=("restored",))
_NO_STREAM: Final[Stream] = (-1, 0, 0.0)

# (family name, label tuple, factor): a series' target without the dict it points at
PlainTarget = tuple[str, tuple[str, ...], float]
Runs = list[list[float]]  # [start, last, last_time, touched], the newest first (Counted.runs)


@dataclass(frozen=True, slots=True)
class SeriesState:
    group: GroupKey
    key: bytes
    runs: Runs
    dropped: int
    horizon: int
    seen: float
    stream: Stream
    targets: tuple[PlainTarget, ...]


# group, series key, forgotten at (ns), runs, dropped
TombState = tuple[GroupKey, bytes, int, Runs, int]


class StateError(ValueError):
    """A checkpoint that cannot be used (corrupt, truncated, another version or aggregation)."""


@dataclass(slots=True)
class State:
    flow_labels: tuple[str, ...]
    totals: dict[str, Totals]
    agents: dict[str, float]
    series: list[SeriesState] = field(default_factory=list)
    written: float = 0.0
    startup_ns: int | None = None  # the rule's start-up (None: a version 1 file; the new process' own)
    floor_ns: int = 0
    tombstones: list[TombState] = field(default_factory=list)


_ROW: Final = 12  # values per series in capture()'s flat list


def capture(agg: Aggregates, table: SeriesTable) -> State:
    """Copy what a restart needs in one instant (takes `agg.lock`, briefly: flat lists only).

    Pending increments are folded first, so the totals and the series' runs describe the same instant.
    Targets are turned into family names outside the lock: the dicts they point at and their label tuples
    never change identity."""
    # Flat lists of existing objects: no tuple per series is made under the lock, so the copy does not
    # trigger the garbage collector (with 100k series a collection held the lock ~15x longer, 350 ms).
    flat: list[tuple[GroupKey, list[Any]]] = []
    with agg.lock:
        table.fold_all()
        for group, entries in table.groups.items():
            values: list[Any] = []
            for key, s in entries.items():
                if s.start >= 0:  # admitted but never counted (its value was rejected): nothing to carry on
                    older = [list(r) for r in s.older] if s.older else None  # runs change in place
                    values += (key, s.start, s.last, s.last_time, older, s.dropped, s.horizon, s.seen)
                    values += (s.out_run, s.out_start, s.out_offset, s.targets)
            flat.append((group, values))
        tombs = list(table.tombstones.items())  # tombstones are never changed, only replaced
        totals = {name: dict(d) for name, d in agg.families().items()}
        agents = dict(agg.agent_last_report)
        startup, floor = table.rule.startup_ns, table.rule.floor_ns
    names = {id(d): name for name, d in agg.families().items()}
    plain: dict[int, tuple[PlainTarget, ...]] = {}  # by id: `flat` keeps every targets tuple alive
    series: list[SeriesState] = []
    for group, values in flat:
        for i in range(0, len(values), _ROW):
            key, start, last, last_time, older, dropped, horizon, seen, run, o_start, o_off, targets = values[
                i : i + _ROW
            ]
            p = plain.get(id(targets))
            if p is None:
                p = plain[id(targets)] = tuple((names[id(d)], k, f) for d, k, f in targets)
            runs = [[start, last, last_time, 0.0], *(older or ())]
            series.append(SeriesState(group, key, runs, dropped, horizon, seen, (run, o_start, o_off), p))
    tombstones = [(group, key, at, runs, dropped) for (group, key), (at, runs, dropped) in tombs]
    return State(agg.flow_labels, totals, agents, series, time.time(), startup, floor, tombstones)


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
    now_ns = int(now * 1e9)
    for group, key, at, runs, dropped in sorted(state.tombstones, key=lambda tomb: tomb[2]):
        table.bury(group, key, runs, dropped, at)
    ranked = sorted(state.series, key=lambda s: s.seen, reverse=True)
    live = [s for s in ranked if s.seen >= now - table.ttl_s][: table.max_series]
    if len(live) < len(ranked):
        log.warning(
            "checkpoint: %d series silent past the TTL or over max_series=%d left as tombstones",
            len(ranked) - len(live),
            table.max_series,
        )
        kept = {id(s) for s in live}
        for s in ranked[::-1]:
            if id(s) not in kept:
                table.bury(s.group, s.key, s.runs, s.dropped, now_ns)
    families = agg.families()
    targets_cache: dict[tuple[PlainTarget, ...], tuple[Any, ...]] = {}
    for s in live:
        targets = targets_cache.get(s.targets)
        if targets is None:
            targets = targets_cache[s.targets] = tuple(
                (families[n], agg.intern(k), f) for n, k, f in s.targets
            )
        entry = Series(RESTORED_GENERATION, _RESTORED, targets, None, seen=s.seen)
        entry.set_runs(s.runs)
        entry.dropped, entry.horizon = s.dropped, s.horizon
        entry.out_run, entry.out_start, entry.out_offset = s.stream
        table.group(*s.group)[s.key] = entry
    table.count = sum(len(g) for g in table.groups.values())
    return len(live)


def encode(state: State) -> bytes:
    """JSON with interned label tuples, target sets and groups (thousands of series share each)."""
    labels: dict[tuple[str, ...], int] = {}
    target_sets: dict[tuple[PlainTarget, ...], int] = {}
    groups: dict[GroupKey, int] = {}
    rows = []
    for s in state.series:
        ti = target_sets.setdefault(s.targets, len(target_sets))
        gi = groups.setdefault(s.group, len(groups))
        rows.append((gi, _b64(s.key), s.runs, s.dropped, s.horizon, s.seen, s.stream, ti))
    tombs = [
        (groups.setdefault(g, len(groups)), _b64(k), at, runs, dropped)
        for g, k, at, runs, dropped in state.tombstones
    ]
    for plain in target_sets:
        for _, k, _ in plain:
            labels.setdefault(k, len(labels))
    for family in state.totals.values():
        for k in family:
            labels.setdefault(k, len(labels))
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "written": state.written,
        "startup_ns": state.startup_ns,
        "floor_ns": state.floor_ns,
        "flow_labels": state.flow_labels,
        "labels": list(labels),
        "totals": {n: [(labels[k], v) for k, v in fam.items()] for n, fam in state.totals.items()},
        "agents": state.agents,
        "groups": [(_b64(r), m) for r, m in groups],
        "targets": [[(n, labels[k], f) for n, k, f in plain] for plain in target_sets],
        "series": rows,
        "tombstones": tombs,
    }
    # gzip level 1: series keys repeat attribute names and addresses (~30x smaller, ~35 ms per 100k
    # series); `zcat` shows the JSON.
    return gzip.compress(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(), 1, mtime=0)


def decode(data: bytes, families: frozenset[str]) -> State:
    """Parse and check a checkpoint; anything unexpected is a StateError (never half a state)."""
    try:
        doc = json.loads(gzip.decompress(data))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StateError("not an otel-kzt enricher state file")
        version = doc.get("version")
        if version not in _READS:
            raise StateError(
                f"unknown version {version!r} (this enricher reads {', '.join(map(str, _READS))})"
            )
        labels = [tuple(_strs(k)) for k in doc["labels"]]
        totals: dict[str, Totals] = {}
        for name, rows in doc["totals"].items():
            if name not in families:
                raise StateError(f"unknown counter family {name!r}")
            totals[name] = {_at(labels, i): _count(v) for i, v in rows}
        targets = [
            tuple((_family(n, families), _at(labels, i), _count(f)) for n, i, f in plain)
            for plain in doc["targets"]
        ]
        groups = [(base64.b64decode(r, validate=True), _str(m)) for r, m in doc["groups"]]
        series = [_series_row(row, version, groups, targets) for row in doc["series"]]
        tombstones: list[TombState] = [
            (_at(groups, g), base64.b64decode(k, validate=True), _int(at), _runs(runs), _start(dropped))
            for g, k, at, runs, dropped in doc.get("tombstones", ())
        ]
        agents = {_str(n): _count(t) for n, t in doc["agents"].items()}
        return State(
            tuple(_strs(doc["flow_labels"])),
            totals,
            agents,
            series,
            _count(doc["written"]),
            None if version == 1 else _int(doc["startup_ns"]),
            _int(doc.get("floor_ns", 0)),
            tombstones,
        )
    except StateError:
        raise
    except (
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        AttributeError,
        binascii.Error,
        OSError,
        EOFError,
    ) as exc:
        raise StateError(f"corrupt: {type(exc).__name__}: {exc}") from exc


def _series_row(
    row: Sequence[Any], version: int, groups: list[GroupKey], targets: list[tuple[PlainTarget, ...]]
) -> SeriesState:
    if version == 1:  # one run per series, no tombstones: its restored runs go on, nothing else is known
        g, k, start, last, last_time, seen, ti = row
        runs = [[_int(start), _count(last), _int(last_time), 0.0]]
        return SeriesState(_at(groups, g), _key(k), runs, -1, 0, _count(seen), _NO_STREAM, _at(targets, ti))
    g, k, runs, dropped, horizon, seen, stream, ti = row
    run, o_start, o_off = stream
    return SeriesState(
        _at(groups, g),
        _key(k),
        _runs(runs),
        _start(dropped),
        _int(horizon),
        _count(seen),
        (_start(run), _int(o_start), _count(o_off)),
        _at(targets, ti),
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _key(text: object) -> bytes:
    return base64.b64decode(_str(text), validate=True)


def _runs(v: object) -> Runs:
    if not isinstance(v, list) or not v:
        raise StateError(f"not a list of runs: {v!r}")
    out = []
    for run in v:
        start, last, last_time, touched = run
        out.append([_int(start), _count(last), _int(last_time), _count(touched)])
    return out


def _start(v: object) -> int:
    """A start time, or -1 for none."""
    return -1 if v == -1 and not isinstance(v, bool) else _int(v)


def _at(table: Sequence[T], i: object) -> T:
    """An interned entry by index (negative indexes would silently pick another one)."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(table):
        raise StateError(f"no entry {i!r} in a table of {len(table)}")
    return table[i]


def _count(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise StateError(f"not a non-negative number: {v!r}")
    return v


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise StateError(f"not a non-negative integer: {v!r}")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise StateError(f"not a string: {v!r}")
    return v


def _strs(v: object) -> list[str]:
    if not isinstance(v, list):
        raise StateError(f"not a list: {v!r}")
    return [_str(x) for x in v]


def _family(name: object, families: frozenset[str]) -> str:
    if name not in families:
        raise StateError(f"unknown counter family {name!r}")
    return str(name)
