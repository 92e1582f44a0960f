"""The enrichment core that both receivers call with one decoded ExportMetricsServiceRequest.

Per request: validate the kzt.flow.* points (rejected ones are removed and reported as partial success),
add the DESIGN §3 attributes, turn cumulative values into increments for the /metrics aggregates, pair
bytes and packets into flow-log records, then hand the re-serialised request to the exporters.

Speed: the same series arrive every interval. Each kzt.flow.* Sum is serialised once (C) and walked as
bytes: a point in the agent's canonical shape (start, time, value first) is split into its 27-byte prefix
and its series key; the cached series supplies the enriched remainder (key + pre-serialised attributes)
and its length header, so the point is re-assembled by concatenation and the Sum re-parsed once (C).
Anything else takes the object path, point by point. Resolution is cached per series while the metadata
generation is unchanged.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)

from otel_kzt import schema
from otel_kzt.enricher.cost import PriceTable
from otel_kzt.enricher.enrich import Resolver
from otel_kzt.enricher.flowlogs import FlowLogWriter, FlowRecord, FlowTemplate, to_otlp_bytes
from otel_kzt.enricher.prometheus import Aggregates, HealthMetrics
from otel_kzt.enricher.series import CANONICAL_PREFIX, Series, SeriesTable, series_key
from otel_kzt.enricher.wire import Writer, length_delimited, read_varint, skip_field, split, varint
from otel_kzt.errors import Overloaded
from otel_kzt.k8s.model import MetadataIndex

log = logging.getLogger(__name__)

# Field numbers of the containers walked as bytes (opentelemetry/proto/.../metrics.proto).
_REQUEST_RESOURCE_METRICS: Final = 1
_RM_RESOURCE: Final = 1
_RM_SCOPE_METRICS: Final = 2
_SM_METRICS: Final = 2
_METRIC_SUM: Final = 7
_POINT_TAG: Final = 0x0A  # Sum.data_points: field 1, length-delimited
_INT_VALUE_TAG: Final = 0x31
# tag, start, tag, time, tag, as_int: the first 27 bytes of a canonical point
_UNPACK_CANONICAL: Final = struct.Struct("<BQBQBq").unpack_from
_BAD_VALUE: Final = "NaN or negative cumulative value"
_NO_ADDRESS: Final = "missing source.address or destination.address"


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
class _Batch:
    """State of one request while it is processed."""

    generation: int
    ready: bool
    now: float
    received: int = 0
    rejected: int = 0
    reasons: dict[str, int] | None = None
    flows: dict[tuple[bytes, bytes], FlowRecord] | None = None

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected += count
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + count


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
        self._flow_logs = flow_log is not None or (flow_logs_otlp and bool(self._sinks))
        self._clock = clock
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._table = SeriesTable(aggregates, max_series, series_ttl_s, health.series_dropped.inc)
        aggregates.before_snapshot = self._table.fold_all
        health.bind(index.ready, lambda: self._table.count)

    @property
    def active_series(self) -> int:
        return self._table.count

    def consume_metrics(self, request: ExportMetricsServiceRequest, raw: bytes | None = None) -> Outcome:
        """Enrich, aggregate and forward one request; raise Overloaded when too many are in flight.

        `raw` is the request's encoding when the receiver has it (saves one serialisation).
        """
        if not self._slots.acquire(blocking=False):
            raise Overloaded("enricher busy: too many requests in flight", retry_after_s=1.0)
        try:
            ready = self._index.ready()
            batch = _Batch(self._index.generation if ready else -1, ready, self._clock())
            buf = request.SerializeToString() if raw is None else raw
            with self._agg.lock:
                payload = self._request(request, buf, batch)
                self._table.maybe_sweep(batch.now)
            if batch.rejected:
                self._health.rejected.inc(batch.rejected)
            self._health.received.inc(batch.received)
            self._emit(payload, batch)
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

    # The request is walked as bytes next to its decoded form: decisions (names, kinds) come from the
    # objects, which are in the same order as the encoded repeated fields; output is re-assembled bytes.

    def _request(self, request: ExportMetricsServiceRequest, buf: bytes, batch: _Batch) -> bytes:
        resources = iter(request.resource_metrics)
        out = Writer()
        for number, whole, payload in split(buf):
            if number == _REQUEST_RESOURCE_METRICS:
                mark = out.open()
                self._resource(next(resources), payload, batch, out)
                out.close(whole[0], mark)
            else:
                out.add(whole)
        return out.getvalue()

    def _resource(self, rm: ResourceMetrics, buf: bytes, batch: _Batch, out: Writer) -> None:
        for kv in rm.resource.attributes:
            if kv.key == schema.RESOURCE_NODE_NAME:
                self._agg.agent_last_report[kv.value.string_value] = batch.now
        fields = list(split(buf))
        res_key = next((p for n, _, p in fields if n == _RM_RESOURCE), b"")
        scopes = iter(rm.scope_metrics)
        for number, whole, payload in fields:
            if number == _RM_SCOPE_METRICS:
                mark = out.open()
                self._scope(next(scopes), payload, res_key, batch, out)
                out.close(whole[0], mark)
            else:
                out.add(whole)

    def _scope(self, sm: ScopeMetrics, buf: bytes, res_key: bytes, batch: _Batch, out: Writer) -> None:
        metrics = iter(sm.metrics)
        for number, whole, payload in split(buf):
            if number != _SM_METRICS:
                out.add(whole)
                continue
            metric = next(metrics)
            batch.received += _count_points(metric)
            if metric.name not in schema.FLOW_METRICS:
                out.add(whole)  # not ours: passes through untouched
            elif self._acceptable(metric, batch):
                mark = out.open()
                self._metric(metric.name, payload, res_key, batch, out)
                out.close(whole[0], mark)
            # else: a kzt.flow.* metric of the wrong kind is refused whole (nothing half-checked goes on)

    def _acceptable(self, metric: Metric, batch: _Batch) -> bool:
        if (
            metric.WhichOneof("data") == "sum"
            and metric.sum.is_monotonic
            and (metric.sum.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE)
        ):
            return True
        batch.reject(f"{metric.name} must be a cumulative monotonic Sum", _count_points(metric))
        return False

    def _metric(self, name: str, buf: bytes, res_key: bytes, batch: _Batch, out: Writer) -> None:
        table = self._table.group(res_key, name)
        for number, whole, payload in split(buf):
            if number == _METRIC_SUM:
                mark = out.open()
                out.size += self._walk(payload, table, (res_key, name), batch, out.parts)
                out.close(whole[0], mark)
            else:
                out.add(whole)

    def _walk(
        self,
        buf: bytes,
        table: dict[bytes, Series],
        where: tuple[bytes, str],
        batch: _Batch,
        out: list[bytes],
    ) -> int:
        """The hot loop: every point of one serialised Sum, enriched, appended to `out`; returns the size.

        Written for speed (one struct call reads tags, times and value; no helper calls on a cache hit).
        """
        size_out = 0
        trailer: list[bytes] = []  # aggregation_temporality, is_monotonic, unknown fields
        pos, end, generation, now, unpack = 0, len(buf), batch.generation, batch.now, _UNPACK_CANONICAL
        while pos < end:
            if buf[pos] != _POINT_TAG:
                after = skip_field(buf, pos)
                trailer.append(buf[pos:after])
                pos = after
                continue
            size = buf[pos + 1]
            if size < 0x80:
                pos += 2
            elif buf[pos + 2] < 0x80:
                size = (size & 0x7F) | (buf[pos + 2] << 7)
                pos += 3
            else:
                size, pos = read_varint(buf, pos + 1)
            raw = buf[pos : pos + size]
            pos += size
            if size < CANONICAL_PREFIX:
                odd = self._odd_point(raw, table, where, batch)
                out.append(odd)
                size_out += len(odd)
                continue
            tag0, start, tag9, t, tag18, value = unpack(raw)
            if tag0 != 0x11 or tag9 != 0x19 or tag18 != _INT_VALUE_TAG:  # not the canonical integer shape
                odd = self._odd_point(raw, table, where, batch)
                out.append(odd)
                size_out += len(odd)
                continue
            key = raw[CANONICAL_PREFIX:]
            entry = table.get(key)
            if entry is None or entry.generation != generation:
                entry = self._resolve(raw, key, table, entry, where[1], batch=batch)
                if entry is None:
                    continue
            if value < 0:
                batch.reject(_BAD_VALUE)
                continue
            inc = value - entry.last if start == entry.start and value >= entry.last else value
            if entry.template is not None and inc:
                self._flow(batch, (where[0], key), entry, where[1], inc, times=(start, t))
            entry.start = start
            entry.last = value
            entry.seen = now
            entry.total += inc
            out += (entry.header, raw[:CANONICAL_PREFIX], entry.tail)
            size_out += entry.size
        out += trailer
        return size_out + sum(map(len, trailer))

    def _odd_point(
        self, raw: bytes, table: dict[bytes, Series], where: tuple[bytes, str], batch: _Batch
    ) -> bytes:
        """A point not in the canonical shape (a field missing, exemplars ...): the object path."""
        dp = NumberDataPoint.FromString(raw)
        key = series_key(raw)
        entry = table.get(key)
        if entry is None or entry.generation != batch.generation:
            entry = self._resolve(raw, key, table, entry, where[1], batch=batch)
            if entry is None:
                return b""
        value = dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double
        if value != value or value < 0:  # noqa: PLR0124
            batch.reject(_BAD_VALUE)
            return b""
        start, t = dp.start_time_unix_nano, dp.time_unix_nano
        inc = value - entry.last if start == entry.start and value >= entry.last else value
        if entry.template is not None and inc:
            self._flow(batch, (where[0], key), entry, where[1], inc, times=(start, t))
        entry.start, entry.last, entry.seen = start, value, batch.now
        entry.total += inc
        dp.MergeFromString(entry.resolved.extra)
        return length_delimited(_POINT_TAG, dp.SerializeToString())

    def _resolve(
        self,
        raw: bytes,
        key: bytes,
        table: dict[bytes, Series],
        entry: Series | None,
        name: str,
        *,
        batch: _Batch,
    ) -> Series | None:
        """Slow path: a new series, or metadata changed since it was resolved."""
        if entry is not None and self._resolver.still_valid(entry.resolved, batch.ready):
            entry.generation = batch.generation
            return entry
        dp = NumberDataPoint.FromString(raw)
        given = {kv.key: kv.value.string_value for kv in dp.attributes}
        if not given.get(schema.SOURCE_ADDRESS) or not given.get(schema.DESTINATION_ADDRESS):
            batch.reject(_NO_ADDRESS)
            return None
        resolved = self._resolver.resolve(given, batch.ready)
        targets = self._agg.targets(
            name, resolved, self._prices.per_byte(resolved.traffic_class, resolved.provider)
        )
        billed = self._flow_logs and resolved.traffic_class in schema.BILLED_CLASSES
        template = FlowTemplate(resolved) if billed else None
        tail = key + resolved.extra
        header = bytes((_POINT_TAG,)) + varint(CANONICAL_PREFIX + len(tail))
        size = len(header) + CANONICAL_PREFIX + len(tail)
        if entry is not None:
            self._table.relabel(entry, resolved, targets, batch.generation)
            entry.template, entry.header, entry.tail, entry.size = template, header, tail, size
            return entry
        fresh = Series(batch.generation, resolved, targets, template, header, tail, size)
        return self._table.admit(table, key, fresh, batch.now)

    def _flow(
        self,
        batch: _Batch,
        flow_id: tuple[bytes, bytes],
        entry: Series,
        name: str,
        inc: float,
        *,
        times: tuple[int, int],
    ) -> None:
        """Pair the bytes and packets increments of one flow into one flow-log record.

        Called before the series takes the new point: the interval starts at the series' previous report,
        or at the point's start time for a new or restarted series.
        """
        start, t = times
        if not entry.targets:
            return  # over the series cap: the increment is not known
        flows = batch.flows if batch.flows is not None else {}
        batch.flows = flows
        record = flows.get(flow_id)
        if record is None:
            assert entry.template is not None
            since = entry.last_time if start == entry.start and entry.last_time else start
            record = flows[flow_id] = FlowRecord(entry.template, since, t)
        entry.last_time = t
        if name == schema.FLOW_BYTES:
            record.byte_count += inc
            record.cost_usd += inc * self._prices.per_byte(
                record.template.traffic_class, record.template.provider
            )
        else:
            record.packet_count += inc

    def _emit(self, payload: bytes, batch: _Batch) -> None:
        records = list(batch.flows.values()) if batch.flows else []
        if records and self._flow_log is not None:
            self._flow_log.write(records)
        if not self._sinks:
            return
        logs = to_otlp_bytes(records) if records and self._flow_logs_otlp else None
        for sink in self._sinks:
            sink.submit_metrics(payload)
            if logs is not None:
                sink.submit_logs(logs)


def _count_points(metric: Metric) -> int:
    kind = metric.WhichOneof("data")
    return len(getattr(metric, kind).data_points) if kind else 0
