"""The enricher's state checkpoint (`--state-file`): restarts without counter resets.

The /metrics counters are sums of the increments of every series ever seen. A new process would start them
from zero and count each live series' whole cumulative value on first sight: Prometheus sees a reset and
increase() over the restart is inflated by the flows' whole history. So the enricher writes, every
`--checkpoint-interval`, on each /metrics scrape (which serves what was written) and on shutdown, one
snapshot taken under the lock that updates both:

- the aggregated totals (and the agents' last report times),
- per series: identity -> start time, last value, last time, last seen, and the totals it adds to.

Restored from the same instant, the next cumulative value of a series adds exactly what came since the
checkpoint, so totals stay exact even after SIGKILL with a stale file. Restored series are re-resolved
against the new process' metadata on their next point (their increments then go where that says).

Format: gzipped JSON (version 1) with interned label tuples, target sets and groups; series keys in base64.
The copy is taken under the lock; encoding and the atomic write (temp + fsync + rename) happen outside.
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
from otel_kzt.enricher.state.series import Series, SeriesTable
from otel_kzt.schema import TrafficClass

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT: Final = "otel-kzt-enricher-state"
VERSION: Final = 1
# Restored series are resolved again on their next point: this generation and basis never match.
RESTORED_GENERATION: Final = -2
_RESTORED = Resolved(b"", {}, TrafficClass.UNKNOWN, None, basis=("restored",))

# (family name, label tuple, factor): a series' target without the dict it points at
PlainTarget = tuple[str, tuple[str, ...], float]
# group (resource key, metric), series key, start, last, last_time, seen, targets
SeriesState = tuple[tuple[bytes, str], bytes, int, float, int, float, tuple[PlainTarget, ...]]


class StateError(ValueError):
    """A checkpoint that cannot be used (corrupt, truncated, another version or aggregation)."""


@dataclass(slots=True)
class State:
    flow_labels: tuple[str, ...]
    totals: dict[str, Totals]
    agents: dict[str, float]
    series: list[SeriesState] = field(default_factory=list)
    written: float = 0.0


def capture(agg: Aggregates, table: SeriesTable) -> State:
    """Copy what a restart needs in one instant (takes `agg.lock`, briefly: flat lists only).

    Pending increments are folded first, so the totals and the series' last values describe the same
    instant. Targets are turned into family names outside the lock: the dicts they point at and their
    label tuples never change identity."""
    # Flat lists of existing objects: no tuple per series is made under the lock, so the copy does not
    # trigger the garbage collector (with 100k series a collection held the lock ~15x longer, 350 ms).
    flat: list[tuple[tuple[bytes, str], list[Any]]] = []
    with agg.lock:
        table.fold_all()
        for group, entries in table.groups.items():
            values: list[Any] = []
            for key, s in entries.items():
                if s.start >= 0:  # admitted but never counted (its value was rejected): nothing to carry on
                    values += (key, s.start, s.last, s.last_time, s.seen, s.targets)
            flat.append((group, values))
        totals = {name: dict(d) for name, d in agg.families().items()}
        agents = dict(agg.agent_last_report)
    names = {id(d): name for name, d in agg.families().items()}
    plain: dict[int, tuple[PlainTarget, ...]] = {}  # by id: `flat` keeps every targets tuple alive
    series: list[SeriesState] = []
    for group, values in flat:
        for i in range(0, len(values), 6):
            key, start, last, last_time, seen, targets = values[i : i + 6]
            p = plain.get(id(targets))
            if p is None:
                p = plain[id(targets)] = tuple((names[id(d)], k, f) for d, k, f in targets)
            series.append((group, key, start, last, last_time, seen, p))
    return State(agg.flow_labels, totals, agents, series, time.time())


def apply(state: State, agg: Aggregates, table: SeriesTable, now: float) -> int:
    """Install a checkpoint into an empty core (caller holds `agg.lock`); returns the series restored.

    Series silent longer than the TTL are left out, and beyond the cap the most recently seen are kept."""
    if state.flow_labels != agg.flow_labels:
        # Other labels are other Prometheus series: restoring half (last values without totals) would lose
        # bytes, so nothing is restored.
        raise StateError(
            f"written for flow_aggregation {list(state.flow_labels)}, now {list(agg.flow_labels)}"
        )
    agg.load(state.totals, state.agents)
    families = agg.families()
    live = [s for s in state.series if s[5] >= now - table.ttl_s]
    live.sort(key=lambda s: s[5], reverse=True)
    if len(live) > table.max_series:
        log.warning(
            "checkpoint: %d series over max_series=%d not restored",
            len(live) - table.max_series,
            table.max_series,
        )
        live = live[: table.max_series]
    targets_cache: dict[tuple[PlainTarget, ...], tuple[Any, ...]] = {}
    for group, key, start, last, last_time, seen, plain in live:
        targets = targets_cache.get(plain)
        if targets is None:
            targets = targets_cache[plain] = tuple((families[n], agg.intern(k), f) for n, k, f in plain)
        entry = Series(
            RESTORED_GENERATION,
            _RESTORED,
            targets,
            None,
            start=start,
            last=last,
            last_time=last_time,
            seen=seen,
        )
        table.group(*group)[key] = entry
    table.count = sum(len(g) for g in table.groups.values())
    return len(live)


def encode(state: State) -> bytes:
    """JSON with interned label tuples, target sets and groups (thousands of series share each)."""
    labels: dict[tuple[str, ...], int] = {}
    target_sets: dict[tuple[PlainTarget, ...], int] = {}
    groups: dict[tuple[bytes, str], int] = {}
    rows = []
    for group, key, start, last, last_time, seen, plain in state.series:
        ti = target_sets.setdefault(plain, len(target_sets))
        gi = groups.setdefault(group, len(groups))
        rows.append((gi, base64.b64encode(key).decode(), start, last, last_time, seen, ti))
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
        "flow_labels": state.flow_labels,
        "labels": list(labels),
        "totals": {n: [(labels[k], v) for k, v in fam.items()] for n, fam in state.totals.items()},
        "agents": state.agents,
        "groups": [(base64.b64encode(r).decode(), m) for r, m in groups],
        "targets": [[(n, labels[k], f) for n, k, f in plain] for plain in target_sets],
        "series": rows,
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
        if doc.get("version") != VERSION:
            raise StateError(f"unknown version {doc.get('version')!r} (this enricher reads {VERSION})")
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
        series: list[SeriesState] = [
            (
                _at(groups, g),
                base64.b64decode(k, validate=True),
                _int(st),
                _count(la),
                _int(lt),
                _count(se),
                _at(targets, t),
            )
            for g, k, st, la, lt, se, t in doc["series"]
        ]
        agents = {_str(n): _count(t) for n, t in doc["agents"].items()}
        return State(tuple(_strs(doc["flow_labels"])), totals, agents, series, _count(doc["written"]))
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
