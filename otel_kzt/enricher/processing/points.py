"""Per-point enrichment of one serialised kzt.flow.* Sum: the core's hot loop and its slow paths.

What a point adds is the counting rule's answer (state/counting.py, called from both paths below); the
increment goes to the series' accumulator (`Series.acc`), billed flows become flow-log records in the
request's `Batch`, and a point the rule holds back (a duplicate, a stale or late point) is not
re-exported. A series renamed by the enricher goes on downstream as a new stream: its run's points get the
rename as their start and the value counted before it taken off (series.py, `out_*`).

A point in the agent's canonical shape (start, time, integer value first) is named by what follows those
27 bytes (its series key) when those bytes are its identity as the object path writes it (attributes, then
flags, as protobuf writes them: checked when a series is named, so the table holds only such keys). Field
order is free on the wire: an exemplar or a second time after the attributes would make a new key every
interval, each point counted whole. The enriched point is the cached length header + the received bytes + the
cached, pre-serialised added attributes (concatenation merges repeated fields). Anything else takes the
object path. A Sum in the same shape as its group's previous one (the agents' steady state) is checked
whole against that pass's layout and only counted per point (repeats.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Aggregates
from otel_kzt.enricher.processing import native
from otel_kzt.enricher.processing.cost import PriceTable
from otel_kzt.enricher.processing.flowlogs import (
    DEFAULT_JSON_LINES,
    DEFAULT_OTLP_LOGS,
    Billed,
    FlowRecords,
    FlowTemplate,
)
from otel_kzt.enricher.processing.pieces import received_given
from otel_kzt.enricher.processing.protowire import length_delimited, read_varint, skip_field
from otel_kzt.enricher.processing.repeats import CRead, Layout, Seen, layout
from otel_kzt.enricher.processing.resolution import Resolved, Resolver
from otel_kzt.enricher.state.counting import Rule
from otel_kzt.enricher.state.series import (
    CANONICAL_POINT,
    CANONICAL_PREFIX,
    GroupKey,
    Naming,
    Series,
    SeriesTable,
    identity_key,
    new_series,
)

_POINT_TAG: Final = 0x0A  # Sum.data_points: field 1, length-delimited
_INT_VALUE_TAG: Final = 0x31
_UNPACK_CANONICAL: Final = CANONICAL_POINT.unpack_from
_PACK_CANONICAL: Final = CANONICAL_POINT.pack
Part = tuple[bytes, int, int]  # a Sum inside the request's bytes: buffer, start, end
Table = dict[bytes, Series]  # one group's series by key
Steady = tuple[Layout, tuple[tuple[bytes, ...], list[int]]]  # a Sum read from its group's layout
# the C loop (processing/_native.c `repeat`): (entries, keys, flat, now, count) -> (billed, declined) or None
_Loop = Callable[..., tuple[list[Billed], set[int] | None] | None]
if native.EXTENSION is not None:
    native.EXTENSION.bind(Series)  # the slots its loop reads and writes
_BAD_VALUE: Final = "NaN or negative cumulative value"
_NO_ADDRESS: Final = "missing source.address or destination.address"


@dataclass(slots=True)
class Batch:
    """State of one request while it is processed."""

    generation: int
    ready: bool
    now: float
    received: int = 0
    rejected: int = 0
    reasons: dict[str, int] | None = None
    flows: FlowRecords | None = None
    # (resource, series key, measured at) -> what `_resolve` made of it in this request: the bytes and
    # packets series of one flow carry the same attributes, so the second is named by the first's answer
    # (and shares its cached naming and flow-log template: half the resolutions and that memory)
    named: dict[tuple[bytes, bytes, int], _Named] | None = None
    layout_sums: int = 0  # flow Sums read from their group's layout (repeats.py) ...
    point_sums: int = 0  # ... and point by point (the general pass)

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected += count
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + count


class _NotAKey(Exception):
    """The bytes after a canonical prefix are not the point's series key: fields other than its attributes
    and flags (exemplars, a time or value again), or those not as protobuf writes them. The object path
    names the point."""


@dataclass(slots=True)  # never changed once made (not frozen: see Resolved)
class _Named:
    """One resolution within a request: the full answer (labels), its price, the slim form series keep,
    and the flow-log template."""

    resolved: Resolved
    usd_per_byte: float
    slim: Resolved
    template: FlowTemplate | None
    labels: tuple[str, ...]  # the flow labels' values (Aggregates.flow_label_values), for both metrics
    key: bytes  # the series key as first seen in the request: both metrics' series are tracked by it


class SumEnricher:
    """Enriches and accounts the points of one Sum at a time; the caller holds the aggregates lock."""

    def __init__(
        self,
        resolver: Resolver,
        table: SeriesTable,
        aggregates: Aggregates,
        prices: PriceTable,
        *,
        json_flow_logs: bool,
        otlp_flow_logs: bool,
    ) -> None:
        self._resolver, self._table, self._agg, self._prices = resolver, table, aggregates, prices
        self._rule: Rule = table.rule
        self._json_flow_logs, self._otlp_flow_logs = json_flow_logs, otlp_flow_logs
        self._flow_logs = json_flow_logs or otlp_flow_logs
        # (resource, metric) -> the shape of its last Sum, valid in the series table's `_epoch`
        self._layouts: dict[GroupKey, Layout] = {}
        self._epoch = table.epoch
        # the layout pass's per-point loop: the C extension's when built and not disabled, else None
        # (`_count_each`); the tests set it to None to run both paths on the same input
        self._loop: _Loop | None = None if native.MODULE is None else native.MODULE.repeat
        self._otlp_logs = DEFAULT_OTLP_LOGS  # the same for the OTLP flow-log records (flowlogs.py)
        self._json_lines = DEFAULT_JSON_LINES  # ... and their JSON lines
        self._read_layout: CRead | None = None if native.MODULE is None else native.MODULE.read_layout
        native.announce()

    def steady(self, part: Part, where: GroupKey, generation: int) -> Steady | None:
        """The Sum at `part` read from its group's current layout, if it fits (nothing counted yet)."""
        self._current()
        known = self._layouts.get(where)
        if known is None or known.generation != generation:
            return None
        read = known.read(*part)
        return None if read is None else (known, read)

    def repeat(self, steady: Steady, where: GroupKey, batch: Batch, out: list[bytes]) -> int:
        """`enrich` of a Sum `steady` read (in this request, under the same lock)."""
        return self._repeat(*steady, where, batch, out)

    def _current(self) -> None:
        if self._epoch != self._table.epoch:  # series forgotten: layouts may hold them
            self._layouts.clear()
            self._epoch = self._table.epoch

    def enrich(self, part: Part, table: Table, where: GroupKey, batch: Batch, out: list[bytes]) -> int:
        """Every point of the serialised Sum at `part` (buffer, start, end), enriched, appended to `out`;
        returns the size. A Sum in its group's last shape is counted from its layout (repeats.py)."""
        self._current()
        known = self._layouts.get(where)
        if known is not None and known.generation == batch.generation:
            read = known.read(*part)
            if read is not None:
                return self._repeat(known, read, where, batch, out)
            # a current layout that did not fit: the group is irregular; learn again from the next pass
            del self._layouts[where]
            return self._general(part, table, where, batch, out, learn=False)
        return self._general(part, table, where, batch, out, learn=True)

    def _repeat(
        self,
        known: Layout,
        read: tuple[tuple[bytes, ...], list[int]],
        where: GroupKey,
        batch: Batch,
        out: list[bytes],
    ) -> int:
        """A Sum checked to be in its layout's shape: only the counting is done per point."""
        raws, flat = read
        batch.layout_sums += 1
        counted = (
            None
            if self._loop is None
            else self._loop(known.entries, known.keys, flat, batch.now, self._rule.count)
        )
        billed, declined = self._count_each(known, flat, batch.now) if counted is None else counted
        if billed:
            self._pair(batch, where, billed, distinct=known.distinct)
        size: int
        if declined is None:
            out += known.enriched(raws)
            size = known.size
        else:
            size = len(known.trailer)
            for entry, header, raw, extra in zip(
                known.entries, known.headers, raws, known.extras, strict=True
            ):
                if id(entry) not in declined:
                    out += (header, raw, extra)
                    size += entry.size
        if known.trailer:
            out.append(known.trailer)
        return size

    def _count_each(self, known: Layout, flat: list[int], now: float) -> tuple[list[Billed], set[int] | None]:
        """`_repeat`'s per-point loop in Python: each point counted by the rule, its increment accumulated
        and billed; the declined as ids of their series (None: none). processing/_native.c `repeat` is
        the same loop in C, taking the rule's common branch itself (the default when built: native.py)."""
        count, billed, declined = self._rule.count, [], None
        points = zip(known.entries, known.keys, flat[1::6], flat[3::6], flat[5::6], strict=True)
        for entry, key, start, t, value in points:
            entry.seen = now
            inc = count(entry, start, t, value, now)
            if inc:
                if inc < 0:  # declined and held back (see the general pass)
                    declined = declined or set()
                    declined.add(id(entry))
                    continue
                entry.acc[0] += inc
                if entry.template is not None:
                    billed.append((entry.template, key, inc, entry.since, t))
        return billed, declined

    def _general(
        self, part: Part, table: Table, where: GroupKey, batch: Batch, out: list[bytes], *, learn: bool
    ) -> int:
        """The hot loop of a Sum in another shape: each point named by its series key, resolved when
        needed. With `learn` (no current layout for the group), the plain points are recorded while every
        point so far was plain, and the group's layout is made from a pass where every point was.

        Written for speed (one struct call reads tags, times and value; no helper calls on a cache hit).
        """
        batch.point_sums += 1
        size_out = 0
        trailer: list[bytes] = []  # aggregation_temporality, is_monotonic, unknown fields
        billed: list[Billed] = []  # flow-log increments of this Sum, paired after the loop
        seen: list[Seen] = []  # the plain points, for the layout
        plain = learn  # every point plain: a layout is made
        (buf, pos, end), generation, now, unpack = part, batch.generation, batch.now, _UNPACK_CANONICAL
        count = self._rule.count
        # a Sum's points mostly share their start and time: one int object each, not one per point (the
        # series keep them: 200k new series in a cluster's first interval)
        last_start = last_t = -1
        while pos < end:
            if buf[pos] != _POINT_TAG:
                after = skip_field(buf, pos)
                trailer.append(buf[pos:after])
                pos = after
                continue
            head = pos
            size = buf[pos + 1]
            if size < 0x80:
                pos += 2
            elif buf[pos + 2] < 0x80:
                size = (size & 0x7F) | (buf[pos + 2] << 7)
                pos += 3
            else:
                size, pos = read_varint(buf, pos + 1)
            raw = buf[pos : pos + size]
            point, pos = pos, pos + size
            canonical = False
            if size >= CANONICAL_PREFIX:
                tag0, start, tag9, t, tag18, value = unpack(raw)
                canonical = tag0 == 0x11 and tag9 == 0x19 and tag18 == _INT_VALUE_TAG
                if start == last_start:
                    start = last_start
                else:
                    last_start = start
                if t == last_t:
                    t = last_t
                else:
                    last_t = t
            if canonical:
                key = raw[CANONICAL_PREFIX:]
                entry = table.get(key)
                if (
                    entry is None
                    or entry.generation != generation
                    or not entry.valid_from <= t < entry.valid_until  # measured across an address reuse
                ):  # named here: the layout holds the naming it ends with (a new series too)
                    try:
                        tracked = self._resolve(raw, key, entry, where, batch=batch, at_ns=t)
                    except _NotAKey:
                        canonical = False
                    else:
                        if tracked is None:
                            plain = False
                            continue
                        entry, key = tracked  # the key object the table holds (a layout keeps it too)
                        if not entry.targets:  # over the series cap: enriched and forwarded, not counted
                            plain = False
                            out += (entry.header, raw, entry.resolved.extra)
                            size_out += entry.size
                            continue
            if not canonical:  # another shape (or not a key): the object path
                odd = self._odd_point(raw, table, where, batch)
                out.append(odd)
                size_out += len(odd)
                plain = False
                continue
            assert entry is not None  # canonical: found or resolved above, a None skipped there (for mypy)
            if value < 0:
                batch.reject(_BAD_VALUE)
                plain = False
                continue
            entry.seen = now
            inc = count(entry, start, t, value, now)
            if inc:
                if inc < 0:
                    plain = False
                    continue  # declined and held back: downstream sees each run once, in order
                entry.acc[0] += inc
                if entry.template is not None:
                    billed.append((entry.template, key, inc, entry.since, t))
            if size == entry.plain_len:  # as the series' cached header was computed for, no rename
                out += (entry.header, raw, entry.resolved.extra)
                if plain:
                    seen.append((head, point, entry, key))
            else:
                plain = False
                if size != entry.point_len:  # first seen in another shape (object path)
                    entry.set_point_len(size)
                if start == entry.out_run:  # renamed by the enricher: a stream of its own downstream
                    offset = int(entry.out_offset)
                    prefix = _PACK_CANONICAL(0x11, entry.out_start, 0x19, t, _INT_VALUE_TAG, value - offset)
                    out += (entry.header, prefix, key, entry.resolved.extra)
                else:
                    out += (entry.header, raw, entry.resolved.extra)
            size_out += entry.size
        if billed:
            self._pair(batch, where, billed)
        out += trailer
        if learn:
            made = (
                layout(generation, part, seen, b"".join(trailer), self._read_layout)
                if plain and seen
                else None
            )
            if made is None:
                self._layouts.pop(where, None)
            else:
                self._layouts[where] = made
        return size_out + sum(map(len, trailer))

    def _odd_point(self, raw: bytes, table: dict[bytes, Series], where: GroupKey, batch: Batch) -> bytes:
        """A point not in the canonical shape (a field missing, another field order, exemplars ...): the
        object path. Its identity is re-encoded from attributes and flags, so it matches the fast path's key
        for the same series whatever order the sender wrote the fields in."""
        dp = NumberDataPoint.FromString(raw)
        key = identity_key(dp)
        entry = table.get(key)
        t = dp.time_unix_nano
        if (
            entry is None
            or entry.generation != batch.generation
            or not entry.valid_from <= t < entry.valid_until
        ):
            tracked = self._resolve(raw, key, entry, where, batch=batch, at_ns=t)
            if tracked is None:
                return b""
            entry = tracked[0]
        is_int = dp.WhichOneof("value") == "as_int"
        value = dp.as_int if is_int else dp.as_double
        if value != value or value < 0:  # noqa: PLR0124
            batch.reject(_BAD_VALUE)
            return b""
        start = dp.start_time_unix_nano
        if entry.targets:  # else over the series cap: enriched and forwarded, not counted
            entry.seen = batch.now
            inc = self._rule.count(entry, start, t, value, batch.now)
            if inc < 0:
                return b""
            if inc:
                entry.acc[0] += inc
                if entry.template is not None:
                    self._pair(batch, where, [(entry.template, key, inc, entry.since, t)])
            if start == entry.out_run:  # renamed by the enricher (see the fast path)
                dp.start_time_unix_nano = entry.out_start
                if is_int:
                    dp.as_int = int(value - entry.out_offset)
                else:
                    dp.as_double = value - entry.out_offset
        dp.MergeFromString(entry.resolved.extra)
        return length_delimited(_POINT_TAG, dp.SerializeToString())

    def _resolve(
        self,
        raw: bytes,
        key: bytes,
        entry: Series | None,
        where: GroupKey,
        *,
        batch: Batch,
        at_ns: int,
    ) -> tuple[Series, bytes] | None:
        """Slow path: a new series, metadata changed since it was resolved, or a point measured outside
        the times its naming holds for (its address reused): named as of its measurement time. With the
        key object the table tracks it by: a new flow's two series (bytes, packets: the same attributes)
        share the first one's."""
        at = at_ns / 1e9 if at_ns > 0 else None
        if entry is not None and self._reuse(entry, batch, at_ns, at, len(raw)):
            return entry, key
        named = self._named(raw, key, where[0], batch, at_ns=at_ns, at=at)
        if named is None:
            return None
        targets = self._agg.targets(where[1], named.resolved, named.usd_per_byte, named.labels)
        if entry is not None:
            self._table.relabel(entry, Naming(named.slim, targets, named.template), batch.generation)
            entry.set_point_len(len(raw))
            return entry, key
        fresh = new_series(batch.generation, named.slim, targets, named.template, len(raw))
        return self._table.admit(where, named.key, fresh, batch.now), named.key

    def _named(
        self, raw: bytes, key: bytes, resource: bytes, batch: Batch, *, at_ns: int, at: float | None
    ) -> _Named | None:
        """The series' attributes resolved as measured at `at_ns`, once per request (see Batch.named)."""
        named = batch.named if batch.named is not None else {}
        batch.named = named
        found = named.get((resource, key, at_ns))
        if found is not None:
            return found
        read = received_given(key)  # the attributes as agents write them, read from the key (cached): a key
        if read is None:
            carried = None
            dp = NumberDataPoint.FromString(raw)
            if identity_key(dp) != key:  # more than its attributes and flags as protobuf writes them
                raise _NotAKey
            given = _given(dp)
        else:
            carried, given = read
        if not given.get(schema.SOURCE_ADDRESS) or not given.get(schema.DESTINATION_ADDRESS):
            batch.reject(_NO_ADDRESS)
            return None
        resolved, added = self._resolver.resolve_encoded(given, batch.ready, at)
        usd_per_byte = self._prices.per_byte(resolved.traffic_class, resolved.provider)
        template = None
        if self._flow_logs and resolved.traffic_class in schema.BILLED_CLASSES:
            template = FlowTemplate(
                resolved,
                usd_per_byte,
                json_lines=self._json_flow_logs,
                otlp=self._otlp_flow_logs,
                encoded=None if carried is None else carried + added,
            )
        labels = self._agg.flow_label_values(resolved.attrs)
        found = named[(resource, key, at_ns)] = _Named(
            resolved, usd_per_byte, resolved.slim(), template, labels, key
        )
        return found

    def _reuse(self, entry: Series, batch: Batch, at_ns: int, at: float | None, point_len: int) -> bool:
        """Name the point with a naming the series already has, if one holds for its measurement time:
        one kept aside in this generation (a switch back across a reuse: no lookup), the current one
        rechecked (after a metadata change: lookups, no encoding), or an older one rechecked."""
        spare = entry.spare or ()
        for generation, kept in spare:
            if generation == batch.generation and kept.holds(at_ns):
                self._swap(entry, kept, batch.generation, point_len)
                return True
        rechecked = self._resolver.recheck(entry.resolved, batch.ready, at)
        if rechecked is not None:
            entry.generation = batch.generation
            if rechecked is not entry.resolved:  # same names, another window
                entry.resolved = rechecked
                entry.set_window()
            return True
        for generation, kept in spare:
            if generation != batch.generation:
                resolved = self._resolver.recheck(kept.resolved, batch.ready, at)
                if resolved is not None:
                    self._swap(
                        entry, Naming(resolved, kept.targets, kept.template), batch.generation, point_len
                    )
                    return True
        return False

    def _swap(self, entry: Series, naming: Naming, generation: int, point_len: int) -> None:
        self._table.relabel(entry, naming, generation)
        entry.set_point_len(point_len)  # other attributes added: another length

    def _pair(self, batch: Batch, where: GroupKey, billed: list[Billed], *, distinct: bool = False) -> None:
        """Pair the bytes and packets increments of each billed flow into one flow-log record per request
        (`distinct`: no series twice in `billed`)."""
        if batch.flows is None:
            batch.flows = FlowRecords(self._otlp_logs, self._json_lines)
        batch.flows.add(where[0], billed, is_bytes=where[1] == schema.FLOW_BYTES, distinct=distinct)


def _given(dp: NumberDataPoint) -> dict[str, str]:
    """A point's attributes as label text. Agents send strings: read as such, and only when a value
    reads empty (maybe another kind) is each read by its kind."""
    attributes = dp.attributes
    given = {kv.key: kv.value.string_value for kv in attributes}
    if "" in given.values():
        given = {kv.key: _text(kv.value) for kv in attributes}
    return given


def _text(value: AnyValue) -> str:
    """An attribute value as label text (ports may come as integers)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return str(value.string_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind in ("int_value", "double_value"):
        return str(getattr(value, kind))
    return ""
