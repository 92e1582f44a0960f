"""The state file's format: zstd-compressed JSON, version 2 (gzipped version 1 files are still read).

Label tuples, target sets and groups are interned (thousands of series share each); the series are written
as columns, their keys as one latin-1 string (a character per byte) with their lengths. `zstdcat` shows
the JSON (100k series: ~45 MB of JSON, 0.4 MB on disk, ~15 ms to compress; gzip level 1 took 100 ms for
2.6 MB). Reading checks every value and raises StateError for anything unexpected: never half a state.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import itertools
import math
from collections.abc import Sequence
from typing import Any, Final, TypeVar

import orjson
import zstandard

from otel_kzt.enricher.exporters.prometheus import Totals
from otel_kzt.enricher.state.checkpoint import (
    Runs,
    SeriesColumns,
    State,
    StateError,
    TombState,
)
from otel_kzt.enricher.state.series import GroupKey

T = TypeVar("T")

FORMAT: Final = "otel-kzt-enricher-state"
VERSION: Final = 2
_READS: Final = (1, 2)
_GZIP_MAGIC: Final = b"\x1f\x8b"
# columns written as they are (after the keys and target sets, which are interned), with their checks
_INTS: Final = ("start", "last_time", "horizon", "out_start")
_STARTS: Final = ("dropped", "out_run")  # a start time or -1
_COUNTS: Final = ("last", "seen", "out_offset")


def encode(state: State) -> bytes:
    labels: dict[tuple[str, ...], int] = {}
    s = state.series
    for plain in state.target_sets:
        for _, k, _ in plain:
            labels.setdefault(k, len(labels))
    for family in state.totals.values():
        for k in family:
            labels.setdefault(k, len(labels))
    tomb_groups: dict[GroupKey, int] = {}
    series: dict[str, Any] = {
        "groups": [(_b64(r), m, n) for (r, m), n in s.groups],
        **_keys(s.key),
        **{name: getattr(s, name) for name in (*_INTS, *_STARTS, *_COUNTS, "older")},
        "targets": s.targets,
    }
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
        "targets": [[(n, labels[k], f) for n, k, f in plain] for plain in state.target_sets],
        "series": series,
        "tombstones": {
            "group": [tomb_groups.setdefault(t[0], len(tomb_groups)) for t in state.tombstones],
            **_keys([t[1] for t in state.tombstones]),
            "at": [t[2] for t in state.tombstones],
            "runs": [t[3] for t in state.tombstones],
            "dropped": [t[4] for t in state.tombstones],
            "groups": [(_b64(r), m) for r, m in tomb_groups],
        },
    }
    # series keys repeat attribute names and addresses: ~60x smaller
    return zstandard.ZstdCompressor(level=1).compress(orjson.dumps(doc))


def decode(data: bytes, families: frozenset[str]) -> State:
    """Parse and check a checkpoint; anything unexpected is a StateError (never half a state)."""
    try:
        unpacked = gzip.decompress(data) if data[:2] == _GZIP_MAGIC else _unzstd(data)
        doc = orjson.loads(unpacked)
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
        agents = {_str(n): _count(t) for n, t in doc["agents"].items()}
        flow_labels, written = tuple(_strs(doc["flow_labels"])), _count(doc["written"])
        if version == 1:
            series = _v1_series(doc, len(targets))
            return State(flow_labels, totals, agents, series, written, target_sets=targets)
        return State(
            flow_labels,
            totals,
            agents,
            _series(doc["series"], len(targets)),
            written,
            _int(doc["startup_ns"]),
            _int(doc["floor_ns"]),
            _tombstones(doc["tombstones"]),
            targets,
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


def _series(doc: dict[str, Any], target_sets: int) -> SeriesColumns:
    groups = [((_unb64(r), _str(m)), _int(n)) for r, m, n in doc["groups"]]
    keys = _split_keys(doc)
    n = len(keys)
    if sum(g[1] for g in groups) != n:
        raise StateError(f"groups hold {sum(g[1] for g in groups)} series, the keys {n}")
    columns: dict[str, Any] = {}
    for name, check in (*((c, _int) for c in _INTS), *((c, _start) for c in _STARTS)):
        columns[name] = _column(doc[name], n, name, check)
    for name in _COUNTS:
        columns[name] = _column(doc[name], n, name, _count)
    columns["older"] = _column(doc["older"], n, "older", lambda v: None if v is None else _runs(v))
    columns["targets"] = _column(doc["targets"], n, "targets", lambda i: _index(i, target_sets))
    return SeriesColumns(groups, keys, **columns)


def _tombstones(doc: dict[str, Any]) -> list[TombState]:
    groups = [(_unb64(r), _str(m)) for r, m in doc["groups"]]
    keys = _split_keys(doc)
    n = len(keys)
    where = [_at(groups, i) for i in _column(doc["group"], n, "group", _int)]
    at = _column(doc["at"], n, "at", _int)
    runs = _column(doc["runs"], n, "runs", _runs)
    dropped = _column(doc["dropped"], n, "dropped", _start)
    return list(zip(where, keys, at, runs, dropped, strict=True))


def _v1_series(doc: dict[str, Any], target_sets: int) -> SeriesColumns:
    """Version 1: one run per series, no tombstones; its runs go on, nothing else is known."""
    groups = [(_unb64(r), _str(m)) for r, m in doc["groups"]]
    out = SeriesColumns()
    for g, k, start, last, last_time, seen, ti in sorted(doc["series"], key=lambda row: _int(row[0])):
        group = _at(groups, g)
        if not out.groups or out.groups[-1][0] != group:
            out.groups.append((group, 0))
        out.groups[-1] = (group, out.groups[-1][1] + 1)
        for name, value in (
            ("key", _unb64(k)),
            ("start", _int(start)),
            ("last", _count(last)),
            ("last_time", _int(last_time)),
            ("older", None),
            ("dropped", -1),
            ("horizon", 0),
            ("seen", _count(seen)),
            ("out_run", -1),
            ("out_start", 0),
            ("out_offset", 0.0),
            ("targets", _index(ti, target_sets)),
        ):
            getattr(out, name).append(value)
    return out


def _unzstd(data: bytes) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise StateError(f"not zstd or gzip data: {exc}") from exc


def _keys(keys: Sequence[bytes]) -> dict[str, Any]:
    return {"keys": b"".join(keys).decode("latin-1"), "key_lengths": list(map(len, keys))}


def _split_keys(doc: dict[str, Any]) -> list[bytes]:
    blob = _str(doc["keys"]).encode("latin-1")
    lengths = [_int(n) for n in doc["key_lengths"]]
    if sum(lengths) != len(blob):
        raise StateError(f"key lengths add up to {sum(lengths)}, the keys hold {len(blob)} bytes")
    ends = list(itertools.accumulate(lengths))
    return [blob[e - n : e] for e, n in zip(ends, lengths, strict=True)]


def _column(values: object, n: int, name: str, check: Any) -> list[Any]:
    if not isinstance(values, list) or len(values) != n:
        raise StateError(f"column {name!r}: expected {n} values")
    return [check(v) for v in values]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: object) -> bytes:
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


def _index(i: object, size: int) -> int:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
        raise StateError(f"no entry {i!r} in a table of {size}")
    return i


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
