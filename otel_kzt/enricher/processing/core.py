"""The enrichment core that both receivers call with one decoded ExportMetricsServiceRequest.

Per request: validate the kzt.flow.* points (rejected ones are removed and reported as partial success),
add the DESIGN §3 attributes, turn cumulative values into increments for the /metrics aggregates, pair
bytes and packets into flow-log records, then hand the re-serialised request to the exporters.

Speed: the same series arrive every interval. The request is walked as bytes next to a plan of it: the
decisions (metric names and kinds) come from the decoded objects, or for a steady request from its bytes
alone (encoded.py: such a request is not decoded at all); the output is re-assembled from the input bytes
and the cached, pre-serialised enrichment of each series (points.py), and joined once. Nothing is
re-encoded by the protobuf library on the hot path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    Metric,
    ResourceMetrics,
)

from otel_kzt import gctune, schema
from otel_kzt.enricher.exporters.prometheus import Aggregates, HealthMetrics
from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.enricher.processing.cost import PriceTable
from otel_kzt.enricher.processing.encoded import MetricPlan, Planner, ResourcePlan, count_points, sender
from otel_kzt.enricher.processing.flowlogs import CAPS as FLOW_LOG_CAPS
from otel_kzt.enricher.processing.flowlogs import FlowLogWriter
from otel_kzt.enricher.processing.pieces import CAPS as PIECES_CAPS
from otel_kzt.enricher.processing.points import Batch, SumEnricher
from otel_kzt.enricher.processing.protowire import Writer, spans
from otel_kzt.enricher.processing.repeats import CAPS as REPEATS_CAPS
from otel_kzt.enricher.processing.resolution import Resolver
from otel_kzt.enricher.state.agents import AgentsHealth
from otel_kzt.enricher.state.checkpoint import State, apply, capture
from otel_kzt.enricher.state.counting import DEFAULT_LATENESS_S, Rule
from otel_kzt.enricher.state.series import SeriesTable
from otel_kzt.errors import Overloaded
from otel_kzt.k8s.model import MetadataIndex, sync_summary

log = logging.getLogger(__name__)
Part = tuple[bytes, int, int]  # a message inside the request's bytes: buffer, start, end (nothing copied)

# Field numbers of the containers walked as bytes (opentelemetry/proto/.../metrics.proto).
_REQUEST_RESOURCE_METRICS: Final = 1
_RM_RESOURCE: Final = 1
_RM_SCOPE_METRICS: Final = 2
_SM_METRICS: Final = 2
_METRIC_SUM: Final = 7
# New series in one request that make it part of a burst (a cluster's first interval: an agent's every flow),
# during which young garbage collections are spaced out further (gctune.burst)
_BURST_SERIES: Final = 64


class Sink(Protocol):
    """An export destination (exporter queue); must never block."""

    def submit_metrics(self, payload: bytes) -> None: ...

    def submit_logs(self, payload: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """Partial-success answer: rejected data points and why (empty message when all accepted)."""

    rejected: int = 0
    message: str = ""


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
        lateness_s: float | None = None,
        max_tombstones: int | None = None,
        max_inflight: int = 16,
        clock: Callable[[], float] = time.time,
        agents: AgentsHealth | None = None,
    ) -> None:
        self._index, self._agg, self._health = index, aggregates, health
        self._agents = agents
        self._sinks = tuple(sinks)
        self._flow_log = flow_log
        self._clock = clock
        self._slots = threading.BoundedSemaphore(max_inflight)
        # Runs that began before this moment may hold bytes another process counted: baselines.
        lateness_s = max(series_ttl_s, DEFAULT_LATENESS_S) if lateness_s is None else lateness_s
        self._rule = Rule(lateness_s, int(clock() * 1e9))
        self._table = SeriesTable(
            aggregates,
            self._rule,
            max_series=max_series,
            ttl_s=series_ttl_s,
            max_tombstones=max_series if max_tombstones is None else max_tombstones,
            on_drop=health.series_dropped.inc,
        )
        self._flow_logs_otlp = flow_logs_otlp and bool(self._sinks)
        self._points = SumEnricher(
            resolver,
            self._table,
            aggregates,
            prices,
            json_flow_logs=flow_log is not None,
            otlp_flow_logs=self._flow_logs_otlp,
        )
        self._planner = Planner(self._points)
        # Every capped cache of the enrichment, for /metrics (exporters/caches.py): this core's own, and the
        # encodings' (pieces, flow-log key orders, point readers' struct codes), which a process shares
        shared = (*PIECES_CAPS, *FLOW_LOG_CAPS, *REPEATS_CAPS)
        self.caps: tuple[Cap, ...] = (*resolver.caps, *self._planner.caps, *shared)
        aggregates.before_snapshot = self._table.fold_all
        health.bind(lambda: sync_summary(index)[0], lambda: self._table.count)

    @property
    def active_series(self) -> int:
        return self._table.count

    def capture_state(self) -> State:
        """A consistent copy of the totals and the series' increment state (--state-file)."""
        return capture(self._agg, self._table, self._clock())  # takes the lock for the copy only

    def restore_state(self, state: State) -> int:
        """Install a checkpoint before the receivers start; returns the series restored."""
        with self._agg.lock:
            return apply(state, self._agg, self._table, self._clock())

    def consume_metrics(self, request: ExportMetricsServiceRequest, raw: bytes | None = None) -> Outcome:
        """Enrich, aggregate and forward one request; raise Overloaded when too many are in flight.

        `raw` is the request's encoding when the receiver has it (saves one serialisation).
        """
        return self._consume(request.SerializeToString() if raw is None else raw, request, None)

    def consume_encoded(self, raw: bytes, decode: Callable[[bytes], ExportMetricsServiceRequest]) -> Outcome:
        """`consume_metrics` of an encoded request: a steady one is walked from its bytes alone
        (encoded.py), any other decoded by `decode` (which raises for an undecodable one: nothing counted)."""
        return self._consume(raw, None, decode)

    def _consume(
        self,
        buf: bytes,
        request: ExportMetricsServiceRequest | None,
        decode: Callable[[bytes], ExportMetricsServiceRequest] | None,
    ) -> Outcome:
        if not self._slots.acquire(blocking=False):
            raise Overloaded("enricher busy: too many requests in flight", retry_after_s=1.0)
        try:
            ready = self._index.ready()
            batch = Batch(self._index.generation if ready else -1, ready, self._clock())
            done = None
            if request is None:
                with self._agg.lock:
                    plan = self._planner.plan(buf, batch.generation)
                    if plan is not None:
                        done = self._walk(buf, iter(plan), batch)
                if done is None:
                    assert decode is not None
                    request = decode(buf)  # outside the lock: the slow path
            if done is None:
                assert request is not None
                with self._agg.lock:
                    done = self._walk(buf, map(_plan, request.resource_metrics), batch)
            payload, declined, evicted = done
            if batch.rejected:
                self._health.rejected.inc(batch.rejected)
                declined[schema.NOT_COUNTED_REJECTED] = batch.rejected
            self._health.received.inc(batch.received)
            self._health.count_reads(
                from_bytes=request is None, layout_sums=batch.layout_sums, point_sums=batch.point_sums
            )
            self._health.count_declined(declined, evicted)
            self._emit(payload, batch)
        finally:
            self._slots.release()
        message = "; ".join(f"{n} data points: {r}" for r, n in sorted((batch.reasons or {}).items()))
        return Outcome(batch.rejected, message)

    def _walk(
        self, buf: bytes, plans: Iterator[ResourcePlan], batch: Batch
    ) -> tuple[bytes, dict[str, int], dict[str, int]]:
        """The enriched request, the points declined and the state evicted; under the aggregates lock."""
        before = self._table.count
        payload = self._request(buf, plans, batch)
        gctune.burst(self._table.count - before >= _BURST_SERIES)
        self._table.maybe_sweep(batch.now)
        return payload, self._rule.take_declined(), self._table.take_evicted()

    def consume_logs(self, request: ExportLogsServiceRequest) -> None:
        """Logs pass through untouched to every exporter."""
        if self._sinks:
            payload = request.SerializeToString()
            for sink in self._sinks:
                sink.submit_logs(payload)

    # Objects and encoded fields are zipped: repeated fields keep their order in any encoding.

    def _request(self, buf: bytes, plans: Iterator[ResourcePlan], batch: Batch) -> bytes:
        out = Writer()
        for number, start, body, end in spans(buf, 0, len(buf)):
            if number == _REQUEST_RESOURCE_METRICS:
                mark = out.open()
                self._resource(next(plans), (buf, body, end), batch, out)
                out.close(buf[start], mark)
            else:
                out.add(buf[start:end])
        return out.getvalue()

    def _resource(self, plan: ResourcePlan, part: Part, batch: Batch, out: Writer) -> None:
        buf, node = part[0], plan.node
        if node:
            self._agg.agent_last_report[node] = batch.now
            if self._agents is not None:
                self._agents.observe(node, plan.metrics, batch.now)  # its kzt.agent.* health (agents.py)
        fields = list(spans(*part))
        res_key = plan.key
        if res_key is None:
            res_key = next((buf[b:e] for n, _, b, e in fields if n == _RM_RESOURCE), b"")
        scopes = iter(plan.scopes)
        for number, start, body, end in fields:
            if number == _RM_SCOPE_METRICS:
                mark = out.open()
                self._scope(iter(next(scopes)), (buf, body, end), res_key, batch, out)
                out.close(buf[start], mark)
            else:
                out.add(buf[start:end])

    def _scope(
        self, metrics: Iterator[MetricPlan], part: Part, res_key: bytes, batch: Batch, out: Writer
    ) -> None:
        buf = part[0]
        for number, start, body, end in spans(*part):
            if number != _SM_METRICS:
                out.add(buf[start:end])
                continue
            metric = next(metrics)
            batch.received += metric.points
            if not metric.flow:
                out.add(buf[start:end])  # not ours: passes through untouched
            elif metric.refused:  # of the wrong kind: refused whole (nothing half-checked goes on)
                batch.reject(f"{metric.name} must be a cumulative monotonic Sum", metric.points)
            else:
                mark = out.open()
                self._metric(metric, (buf, body, end), res_key, batch, out)
                out.close(buf[start], mark)

    def _metric(self, metric: MetricPlan, part: Part, res_key: bytes, batch: Batch, out: Writer) -> None:
        buf, where, steady = part[0], (res_key, metric.name), metric.steady
        table = self._table.group(res_key, metric.name) if steady is None else {}
        for number, start, body, end in spans(*part):
            if number == _METRIC_SUM:
                mark = out.open()
                if steady is None:
                    out.size += self._points.enrich((buf, body, end), table, where, batch, out.parts)
                else:
                    out.size += self._points.repeat(steady, where, batch, out.parts)
                out.close(buf[start], mark)
            else:
                out.add(buf[start:end])

    def _emit(self, payload: bytes, batch: Batch) -> None:
        records = batch.flows if batch.flows is not None and len(batch.flows) else None
        if records is not None and self._flow_log is not None:
            self._flow_log.write(records)
        if not self._sinks:
            return
        logs = records.otlp_request() if records is not None and self._flow_logs_otlp else None
        for sink in self._sinks:
            if payload:  # an empty request has nothing to forward
                sink.submit_metrics(payload)
            if logs is not None:
                sink.submit_logs(logs)


def _plan(rm: ResourceMetrics) -> ResourcePlan:
    """The object path's plan of a decoded resource (the walk reads it as it goes)."""
    node, key = sender(rm.resource, b"")
    return ResourcePlan(
        node,
        key if node else None,
        (metric for sm in rm.scope_metrics for metric in sm.metrics),
        (map(_metric_plan, sm.metrics) for sm in rm.scope_metrics),
    )


def _metric_plan(metric: Metric) -> MetricPlan:
    name, points = metric.name, count_points(metric)
    if name not in schema.FLOW_METRICS:
        return MetricPlan(name, points)
    acceptable = (
        metric.WhichOneof("data") == "sum"
        and metric.sum.is_monotonic
        and metric.sum.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
    )
    return MetricPlan(name, points, flow=True, refused=not acceptable)
