"""The enrichment core that both receivers call with one decoded ExportMetricsServiceRequest.

Per request: validate the kzt.flow.* points (rejected ones are removed and reported as partial success),
add the DESIGN §3 attributes, turn cumulative values into increments for the /metrics aggregates, pair
bytes and packets into flow-log records, then hand the re-serialised request to the exporters.

Speed: the same series arrive every interval. A series is keyed by its serialised data point minus the
leading time/value fields (cheap, done in C), and its resolution (the extra attributes pre-serialised,
the aggregate targets) is cached per series while the metadata generation is unchanged; the per-point
work is then one dict lookup, one `MergeFromString` and a few arithmetic operations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE, Metric

from otel_kzt import schema
from otel_kzt.enricher.cost import PriceTable
from otel_kzt.enricher.enrich import Resolved, Resolver
from otel_kzt.enricher.flowlogs import FlowLogWriter, FlowRecord, to_otlp
from otel_kzt.enricher.prometheus import Aggregates, HealthMetrics, Target
from otel_kzt.errors import Overloaded
from otel_kzt.k8s.model import MetadataIndex

log = logging.getLogger(__name__)

# Tags of NumberDataPoint fields 2 (start), 3 (time), 4 (as_double), 6 (as_int): each 1 byte + 8 bytes
# fixed; upb writes fields in number order, so they lead the encoding and the rest identifies the series.
_FIXED_TAGS: Final = frozenset({0x11, 0x19, 0x21, 0x31})
_CAP_LOG_EVERY_S: Final = 60.0


class Sink(Protocol):
    """An export destination (exporter queue); must never block."""

    def submit_metrics(self, payload: bytes) -> None: ...

    def submit_logs(self, payload: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """Partial-success answer: rejected data points and why (empty message when all accepted)."""

    rejected: int = 0
    message: str = ""


@dataclass(slots=True)
class _Series:
    generation: int
    resolved: Resolved
    targets: tuple[Target, ...]
    start: int = -1
    last: float = 0.0
    last_time: int = 0
    seen: float = 0.0


@dataclass(slots=True)
class _Batch:
    """State of one request while it is processed."""

    generation: int
    ready: bool
    now: float
    rejected: int = 0
    reasons: dict[str, int] | None = None
    flows: dict[tuple[bytes, bytes], FlowRecord] | None = None

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected += count
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + count


def series_key(raw: bytes) -> bytes:
    """A serialised data point without its leading start/time/value fields."""
    if len(raw) >= 27 and raw[0] == 0x11 and raw[9] == 0x19 and raw[18] in (0x21, 0x31):
        return raw[27:]  # the agent's shape: all three present
    i = 0
    while i < len(raw) and raw[i] in _FIXED_TAGS:
        i += 9
    return raw[i:]


class Core:
    def __init__(
        self,
        index: MetadataIndex,
        resolver: Resolver,
        aggregates: Aggregates,
        health: HealthMetrics,
        prices: PriceTable,
        *,
        sinks: Sequence[Sink] = (),
        flow_log: FlowLogWriter | None = None,
        flow_logs_otlp: bool = True,
        max_series: int = 200_000,
        series_ttl_s: float = 600.0,
        max_inflight: int = 16,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._index, self._resolver, self._agg, self._health = index, resolver, aggregates, health
        self._prices = prices
        self._sinks = tuple(sinks)
        self._flow_log, self._flow_logs_otlp = flow_log, flow_logs_otlp
        self._max_series, self._ttl = max_series, series_ttl_s
        self._clock = clock
        self._slots = threading.BoundedSemaphore(max_inflight)
        # (resource bytes, metric name) -> series key -> state; guarded by aggregates.lock
        self._series: dict[tuple[bytes, str], dict[bytes, _Series]] = {}
        self._n_series = 0
        self._last_sweep = clock()
        self._last_cap_log = 0.0
        health.bind(index.ready, lambda: self._n_series)

    @property
    def active_series(self) -> int:
        return self._n_series

    def consume_metrics(self, request: ExportMetricsServiceRequest) -> Outcome:
        """Enrich, aggregate and forward one request; raise Overloaded when too many are in flight."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded("enricher busy: too many requests in flight", retry_after_s=1.0)
        try:
            ready = self._index.ready()
            batch = _Batch(self._index.generation if ready else -1, ready, self._clock())
            with self._agg.lock:
                for rm in request.resource_metrics:
                    self._resource(rm, batch)
                self._maybe_sweep(batch.now)
            if batch.rejected:
                self._health.rejected.inc(batch.rejected)
            self._emit(request, batch)
        finally:
            self._slots.release()
        message = "; ".join(f"{n} data points: {r}" for r, n in sorted((batch.reasons or {}).items()))
        return Outcome(batch.rejected, message)

    def consume_logs(self, request: ExportLogsServiceRequest) -> None:
        """Logs pass through untouched to every exporter."""
        if self._sinks:
            payload = request.SerializeToString()
            for sink in self._sinks:
                sink.submit_logs(payload)

    def _resource(self, rm: object, batch: _Batch) -> None:
        resource = rm.resource  # type: ignore[attr-defined]
        for kv in resource.attributes:
            if kv.key == schema.RESOURCE_NODE_NAME:
                self._agg.agent_last_report[kv.value.string_value] = batch.now
        res_key = resource.SerializeToString()
        received = 0
        for sm in rm.scope_metrics:  # type: ignore[attr-defined]
            refused: list[int] = []
            for i, metric in enumerate(sm.metrics):
                received += _count_points(metric)
                if metric.name in schema.FLOW_METRICS and not self._flow_metric(metric, res_key, batch):
                    refused.append(i)
            # A kzt.flow.* metric of the wrong kind is refused whole (no half-checked metric goes on).
            for i in reversed(refused):
                del sm.metrics[i]
        self._health.received.inc(received)

    def _flow_metric(self, metric: Metric, res_key: bytes, batch: _Batch) -> bool:
        if (
            metric.WhichOneof("data") != "sum"
            or not metric.sum.is_monotonic
            or (metric.sum.aggregation_temporality != AGGREGATION_TEMPORALITY_CUMULATIVE)
        ):
            batch.reject(f"{metric.name} must be a cumulative monotonic Sum", _count_points(metric))
            return False
        table = self._series.setdefault((res_key, metric.name), {})
        dps = metric.sum.data_points
        bad: list[int] = []
        for i, dp in enumerate(dps):
            key = series_key(dp.SerializeToString())
            entry = table.get(key)
            if entry is None or entry.generation != batch.generation:
                entry = self._resolve(dp, key, table, entry, name=metric.name, batch=batch)
                if entry is None:
                    bad.append(i)
                    continue
            value = dp.as_int or dp.as_double
            if value != value or value < 0:  # noqa: PLR0124 -- NaN or negative: not a counter (no call: hot path)
                batch.reject("NaN or negative cumulative value")
                bad.append(i)
                continue
            start = dp.start_time_unix_nano
            increment = value - entry.last if start == entry.start and value >= entry.last else value
            prev_time = entry.last_time or start
            entry.start, entry.last, entry.last_time, entry.seen = start, value, dp.time_unix_nano, batch.now
            if increment and entry.targets:  # no targets: over the series cap, not aggregated
                for totals, labels, factor in entry.targets:
                    totals[labels] = totals.get(labels, 0.0) + increment * factor
                if entry.resolved.traffic_class in schema.BILLED_CLASSES and self._wants_flow_logs:
                    span = (prev_time, dp.time_unix_nano)
                    self._flow(batch, (res_key, key), entry, name=metric.name, inc=increment, span=span)
            dp.MergeFromString(entry.resolved.extra)
        for i in reversed(bad):
            del dps[i]
        return True

    def _resolve(
        self,
        dp: object,
        key: bytes,
        table: dict[bytes, _Series],
        entry: _Series | None,
        *,
        name: str,
        batch: _Batch,
    ) -> _Series | None:
        """Slow path: a new series, or metadata changed since it was resolved."""
        given = {kv.key: kv.value.string_value for kv in dp.attributes}  # type: ignore[attr-defined]
        if not given.get(schema.SOURCE_ADDRESS) or not given.get(schema.DESTINATION_ADDRESS):
            batch.reject("missing source.address or destination.address")
            return None
        resolved = self._resolver.resolve(given, batch.ready)
        usd_per_byte = self._prices.per_byte(resolved.traffic_class, resolved.provider)
        targets = self._agg.targets(name, resolved, usd_per_byte)
        if entry is not None:
            entry.generation, entry.resolved, entry.targets = batch.generation, resolved, targets
            return entry
        entry = _Series(batch.generation, resolved, targets)
        if self._n_series >= self._max_series:
            self._health.series_dropped.inc()
            if batch.now - self._last_cap_log >= _CAP_LOG_EVERY_S:
                self._last_cap_log = batch.now
                log.warning("series cap reached: max_series=%d, new series not aggregated", self._max_series)
            return _Untracked(entry)
        table[key] = entry
        self._n_series += 1
        return entry

    @property
    def _wants_flow_logs(self) -> bool:
        return self._flow_log is not None or (self._flow_logs_otlp and bool(self._sinks))

    def _flow(
        self,
        batch: _Batch,
        flow_id: tuple[bytes, bytes],
        entry: _Series,
        *,
        name: str,
        inc: float,
        span: tuple[int, int],
    ) -> None:
        """Pair the bytes and packets increments of one flow into one flow-log record."""
        flows = batch.flows if batch.flows is not None else {}
        batch.flows = flows
        record = flows.get(flow_id)
        if record is None:
            resolved = entry.resolved
            record = flows[flow_id] = FlowRecord(resolved.attrs, resolved.traffic_class, *span)
        if name == schema.FLOW_BYTES:
            record.bytes += inc
            record.cost_usd += inc * self._prices.per_byte(record.traffic_class, entry.resolved.provider)
        else:
            record.packets += inc

    def _emit(self, request: ExportMetricsServiceRequest, batch: _Batch) -> None:
        records = list(batch.flows.values()) if batch.flows else []
        if records and self._flow_log is not None:
            self._flow_log.write(records)
        if not self._sinks:
            return
        payload = request.SerializeToString()
        logs = to_otlp(records).SerializeToString() if records and self._flow_logs_otlp else None
        for sink in self._sinks:
            sink.submit_metrics(payload)
            if logs is not None:
                sink.submit_logs(logs)

    def _maybe_sweep(self, now: float) -> None:
        """Forget series silent for longer than the TTL (caller holds the aggregates lock)."""
        if now - self._last_sweep < min(self._ttl / 4, 30.0):
            return
        self._last_sweep = now
        cutoff = now - self._ttl
        live: list[tuple[Target, ...]] = []
        for group_key, table in list(self._series.items()):
            for key in [k for k, s in table.items() if s.seen < cutoff]:
                del table[key]
                self._n_series -= 1
            if not table:
                del self._series[group_key]
            live.extend(s.targets for s in table.values())
        self._agg.retain(live, cutoff)


class _Untracked(_Series):
    """A series over the cap: enriched and forwarded, its increments not aggregated."""

    def __init__(self, entry: _Series) -> None:
        super().__init__(entry.generation, entry.resolved, ())


def _count_points(metric: Metric) -> int:
    kind = metric.WhichOneof("data")
    return len(getattr(metric, kind).data_points) if kind else 0
