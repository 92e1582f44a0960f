"""Per-series state of the core: the cached resolution and the cumulative -> increment bookkeeping.

A series is one (resource, metric, data-point attributes) combination. Its key is the serialised data point
minus the leading start/time/value fields, so it costs one slice. Increments are added to `Series.total`
on the hot path and folded into the aggregate counters (prometheus.Aggregates) only when /metrics is
scraped, when the series' labels change, or when it is forgotten: per point that is one addition.

A series' naming holds for the measurement times of its `Resolved` window; a point measured outside it (an
address reused while the point was on its way) is named again. Replaced namings are kept aside (`spare`,
with the generation they were valid in), so a series whose points alternate across a reuse swaps namings
instead of resolving again each time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

from otel_kzt.enricher.exporters.prometheus import Aggregates, Target
from otel_kzt.enricher.processing.flowlogs import FlowTemplate
from otel_kzt.enricher.processing.protowire import varint
from otel_kzt.enricher.processing.resolution import Resolved

log = logging.getLogger(__name__)

# NumberDataPoint fields 2 (start), 3 (time), 4 (as_double) / 6 (as_int) are 1 tag byte + 8 fixed bytes
# each. Encoders that write fields in number order (upb, Go, Java) put them first: after these 27 bytes
# come the attributes (and flags), which name the series.
CANONICAL_PREFIX: Final = 27
POINT_TAG: Final = 0x0A  # Sum.data_points: field 1, length-delimited
_CAP_LOG_EVERY_S: Final = 60.0
_MAX_SPARE: Final = 3  # namings kept aside per series (an address reused more often falls back to resolve)


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

    def holds(self, at_ns: int) -> bool:
        return self.resolved.valid_from * 1e9 <= at_ns < self.resolved.valid_until * 1e9


@dataclass(slots=True)
class Series:
    generation: int
    resolved: Resolved
    targets: tuple[Target, ...]  # empty: over the series cap, enriched but not aggregated
    template: FlowTemplate | None  # set for billed classes (flow logs)
    header: bytes = b""  # Sum.data_points tag + length of the enriched point
    size: int = 0  # len(header) + the enriched point's length
    point_len: int = -1  # length of the received point these were computed for
    start: int = -1
    last: float = 0.0
    last_time: int = 0  # time_unix_nano of the last point counted
    seen: float = 0.0
    total: float = 0.0  # increments not yet folded into the aggregates
    valid_from: float = -math.inf  # time_unix_nano window [from, until) `resolved` holds for
    valid_until: float = math.inf
    spare: list[tuple[int, Naming]] | None = None  # replaced namings and their generation (see docstring)

    def __post_init__(self) -> None:
        self.set_window()

    def set_window(self) -> None:
        self.valid_from = self.resolved.valid_from * 1e9
        self.valid_until = self.resolved.valid_until * 1e9

    def set_point_len(self, point_len: int) -> None:
        """Canonical points of one series all have the same length: the header is computed once."""
        enriched = point_len + len(self.resolved.extra)
        self.header = bytes((POINT_TAG,)) + varint(enriched)
        self.size = len(self.header) + enriched
        self.point_len = point_len


class SeriesTable:
    """(resource bytes, metric) -> series key -> Series, with a cap and a TTL. Caller holds the lock."""

    def __init__(self, aggregates: Aggregates, max_series: int, ttl_s: float, on_drop: Callable[[], None]):
        self._agg = aggregates
        self.max_series, self.ttl_s = max_series, ttl_s
        self.groups: dict[tuple[bytes, str], dict[bytes, Series]] = {}
        self.count = 0
        self._on_drop = on_drop
        self._last_cap_log = -_CAP_LOG_EVERY_S
        self._last_sweep: float | None = None

    def group(self, resource: bytes, metric: str) -> dict[bytes, Series]:
        return self.groups.setdefault((resource, metric), {})

    def admit(self, table: dict[bytes, Series], key: bytes, entry: Series, now: float) -> Series:
        """Track a new series, or hand it back untracked (no targets) when the cap is reached."""
        if self.count >= self.max_series:
            self._on_drop()
            if now - self._last_cap_log >= _CAP_LOG_EVERY_S:
                self._last_cap_log = now
                log.warning(
                    "series cap reached: max_series=%d; new series are not aggregated", self.max_series
                )
            entry.targets = ()
            return entry
        table[key] = entry
        self.count += 1
        return entry

    def relabel(self, entry: Series, naming: Naming, generation: int) -> None:
        """Another naming (metadata changed, or a point measured across an address reuse): what was
        counted so far stays with the old labels, and the old naming is kept aside."""
        self.fold(entry)
        spare = [s for s in entry.spare or () if s[1].resolved.basis != naming.resolved.basis]
        spare.insert(0, (entry.generation, Naming(entry.resolved, entry.targets, entry.template)))
        del spare[_MAX_SPARE:]
        entry.spare = spare
        entry.generation, entry.resolved = generation, naming.resolved
        entry.targets, entry.template = naming.targets, naming.template
        entry.set_window()

    def fold(self, entry: Series) -> None:
        if entry.total:
            for totals, labels, factor in entry.targets:
                totals[labels] = totals.get(labels, 0.0) + entry.total * factor
            entry.total = 0.0

    def fold_all(self) -> None:
        for table in self.groups.values():
            for entry in table.values():
                if entry.total:
                    self.fold(entry)

    def maybe_sweep(self, now: float) -> None:
        """Forget series silent for longer than the TTL, and aggregates no live series feeds."""
        if self._last_sweep is None:
            self._last_sweep = now
        if now - self._last_sweep < min(self.ttl_s / 4, 30.0):
            return
        self._last_sweep = now
        cutoff = now - self.ttl_s
        live: list[tuple[Target, ...]] = []
        for group_key, table in list(self.groups.items()):
            for key in [k for k, s in table.items() if s.seen < cutoff]:
                self.fold(table.pop(key))
                self.count -= 1
            if not table:
                del self.groups[group_key]
            live.extend(s.targets for s in table.values())
            # a naming kept aside may take over again: its aggregates must not be dropped meanwhile
            live.extend(n.targets for s in table.values() if s.spare for _, n in s.spare)
        self._agg.retain(live, now, self.ttl_s)
