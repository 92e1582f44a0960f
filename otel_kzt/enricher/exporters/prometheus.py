"""Prometheus exposition: aggregated monotonic counters (DESIGN §4) and the enricher's own health.

`Aggregates` holds plain dicts label-tuple -> total. The core adds increments under `lock`; the custom
collector copies the dicts under the same lock and builds the exposition outside it. Everything is
registered on an explicit CollectorRegistry (no global state).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from otel_kzt import schema
from otel_kzt.enricher.exporters.savings import SAVINGS_BYTES, SAVINGS_USD, SERVICE_BYTES
from otel_kzt.enricher.exporters.savings import counters as savings_counters
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.enricher.processing.services import service_targets
from otel_kzt.schema import TrafficClass

Totals = dict[tuple[str, ...], float]
Snapshot = dict[str, dict[tuple[str, ...], float]]  # family name (and "agents") -> label tuple -> value
# One place an increment of a series goes: (totals dict, label values, multiplier).
Target = tuple[Totals, tuple[str, ...], float]

_CROSS_ZONE_CLASSES: Final = frozenset({TrafficClass.CROSS_ZONE, TrafficClass.CROSS_REGION})
# What a byte series' targets read besides its flow labels, class, price, Services and which ports it has
# (the source pod's own target aside): series equal in these share their targets (Aggregates.targets).
_BYTES_BASIS: Final = tuple(
    schema.end_attr(end, suffix)
    for end in (schema.SOURCE, schema.DESTINATION)
    for suffix in (schema.AVAILABILITY_ZONE, schema.NAMESPACE_NAME, schema.WORKLOAD_KIND,
                   schema.WORKLOAD_NAME)
)  # fmt: skip
# Aggregates.targets' parts of byte series: targets before the pod's, after it, the sets by pod, and the
# keys of the parts before and after (Aggregates._share: a set's key is made of its parts' keys)
_BytesParts = tuple[
    tuple[Target, ...],
    tuple[Target, ...],
    dict[tuple[str, str] | None, tuple[Target, ...]],
    tuple[object, ...],
    tuple[object, ...],
]


def _share_key(targets: Sequence[Target]) -> tuple[object, ...]:
    """What makes two sets of targets the same: each target's counters (by identity), labels and factor."""
    return tuple([(id(d), k, f) for d, k, f in targets])


class Aggregates:
    """Counters that only go up: each is the sum of the increments of its member series."""

    def __init__(self, flow_labels: Sequence[str]) -> None:
        self.lock = threading.Lock()
        self.flow_labels = tuple(flow_labels)
        self._blanks = ("",) * len(self.flow_labels)  # each label's default (map(attrs.get, labels, blanks))
        self.flow_bytes: Totals = {}
        self.flow_packets: Totals = {}
        self.pod_cross_zone: Totals = {}
        self.zone_bytes: Totals = {}
        self.cost: Totals = {}
        # Services and savings (processing/services.py makes their keys, exporters/savings.py exposes them)
        self.service_bytes: Totals = {}
        self.savings_bytes: Totals = {}
        self.savings_usd: Totals = {}
        self.agent_last_report: dict[str, float] = {}
        self._orphaned: dict[tuple[int, tuple[str, ...]], float] = {}  # entry -> since no series feeds it
        self._interned: dict[tuple[str, ...], tuple[str, ...]] = {}  # pruned with the entries in retain()
        self._target_sets: dict[tuple[object, ...], tuple[Target, ...]] = {}  # pruned in retain() too
        # shortcuts to those sets for new series (see `targets`), emptied in retain()
        self._packets_sets: dict[tuple[str, ...], tuple[Target, ...]] = {}
        self._bytes_sets: dict[tuple[object, ...], _BytesParts] = {}
        # Folds pending per-series increments into the dicts above; set by the core, run under `lock`.
        self.before_snapshot: Callable[[], None] | None = None

    def flow_label_values(self, attrs: Mapping[str, str]) -> tuple[str, ...]:
        """A series' flow labels' values (`targets` reads them; a flow's bytes and packets share them)."""
        return tuple(map(attrs.get, self.flow_labels, self._blanks))

    def targets(
        self, metric: str, resolved: Resolved, usd_per_byte: float, labels: tuple[str, ...] | None = None
    ) -> tuple[Target, ...]:
        """Where increments of one series go; computed once per series and metadata generation.

        Label tuples are interned: thousands of series feed the same workload-level entry. A new series
        (100k in a cluster's first interval) mostly finds its set made for another: packets by their
        flow labels, bytes by what their targets read (`_BYTES_BASIS`) and then their source pod.
        `labels`: flow_label_values(resolved.attrs), when the caller has them."""
        attrs = resolved.attrs
        if labels is None:
            labels = self.flow_label_values(attrs)
        if metric == schema.FLOW_PACKETS:
            found = self._packets_sets.get(labels)
            if found is None:
                found = self._share(((self.flow_packets, self.intern(labels), 1.0),))
                self._packets_sets[labels] = found
            return found
        cls = resolved.traffic_class
        basis = (labels, cls, usd_per_byte, resolved.services, *map(attrs.get, _BYTES_BASIS),
                 not attrs.get(schema.DESTINATION_PORT), not attrs.get(schema.SOURCE_PORT))  # fmt: skip
        made = self._bytes_sets.get(basis)
        if made is None:
            made = self._bytes_sets[basis] = self._bytes_parts(labels, resolved, usd_per_byte)
        before, after, by_pod, before_key, after_key = made
        pod, namespace = attrs.get(schema.SOURCE_POD_NAME), attrs.get(schema.SOURCE_NAMESPACE_NAME)
        pod_key = (namespace, pod) if cls in _CROSS_ZONE_CLASSES and pod and namespace else None
        found = by_pod.get(pod_key)
        if found is None:
            if pod_key is None:
                targets, key = before + after, before_key + after_key
            else:
                middle = (self.pod_cross_zone, self.intern(pod_key), 1.0)
                targets = (*before, middle, *after)
                key = (*before_key, (id(self.pod_cross_zone), middle[1], 1.0), *after_key)
            found = by_pod[pod_key] = self._target_sets.setdefault(key, targets)
        return found

    def _bytes_parts(self, labels: tuple[str, ...], resolved: Resolved, usd_per_byte: float) -> _BytesParts:
        """A byte series' targets before its source pod's (flow, zones) and after it (cost, Services,
        savings), and the full sets by pod made of them."""
        attrs = resolved.attrs
        before: list[Target] = [(self.flow_bytes, self.intern(labels), 1.0)]
        src_zone, dst_zone = attrs.get(schema.SOURCE_ZONE), attrs.get(schema.DESTINATION_ZONE)
        if src_zone and dst_zone:
            before.append((self.zone_bytes, self.intern((src_zone, dst_zone)), 1.0))
        after: list[Target] = []
        if resolved.traffic_class in schema.BILLED_CLASSES and usd_per_byte > 0:
            cost_key = (
                attrs.get(schema.SOURCE_NAMESPACE_NAME, ""),
                attrs.get(schema.SOURCE_WORKLOAD_KIND, ""),
                attrs.get(schema.SOURCE_WORKLOAD_NAME, ""),
                resolved.traffic_class.value,
            )
            after.append((self.cost, self.intern(cost_key), usd_per_byte))
        after += service_targets(self, attrs, resolved.traffic_class, resolved.services, usd_per_byte)
        return tuple(before), tuple(after), {}, _share_key(before), _share_key(after)

    def _share(self, targets: tuple[Target, ...]) -> tuple[Target, ...]:
        """One tuple per distinct set of targets, shared by its series (memory; a checkpoint copies few)."""
        return self._target_sets.setdefault(_share_key(targets), targets)

    def intern(self, key: tuple[str, ...]) -> tuple[str, ...]:
        return self._interned.setdefault(key, key)

    def families(self) -> dict[str, Totals]:
        """The counter dicts by name (checkpoints); the dicts themselves, never replaced."""
        return {
            "flow_bytes": self.flow_bytes,
            "flow_packets": self.flow_packets,
            "pod_cross_zone": self.pod_cross_zone,
            "zone_bytes": self.zone_bytes,
            "cost": self.cost,
            SERVICE_BYTES: self.service_bytes,
            SAVINGS_BYTES: self.savings_bytes,
            SAVINGS_USD: self.savings_usd,
        }

    def load(self, totals: Mapping[str, Totals], agents: Mapping[str, float]) -> None:
        """Replace every total with a checkpoint's (caller holds `lock`), in place: series' targets point
        at these dicts. Label tuples are interned like the ones `targets` makes."""
        for name, family in self.families().items():
            family.clear()
            family.update((self.intern(k), v) for k, v in totals.get(name, {}).items())
        self.agent_last_report.clear()
        self.agent_last_report.update(agents)

    def retain(self, live: Sequence[tuple[Target, ...]], now: float, ttl_s: float) -> None:
        """Drop aggregate entries no live series has fed for `ttl_s`, and agents silent as long.

        Caller holds `lock`. Entries with live members keep their totals, so counters never go back; an
        entry whose members all went away (pods gone, labels changed) stays for the TTL, then goes.
        """
        keep: dict[int, set[tuple[str, ...]]] = {}
        distinct = list({id(t): t for t in live}.values())  # series share their targets tuples
        self._target_sets = {_share_key(t): t for t in distinct}
        self._packets_sets, self._bytes_sets = {}, {}
        for targets in distinct:
            for totals, key, _ in targets:
                keep.setdefault(id(totals), set()).add(key)
        orphans: dict[tuple[int, tuple[str, ...]], float] = {}
        for totals in self._all():
            wanted = keep.get(id(totals), set())
            for key in [k for k in totals if k not in wanted]:
                since = self._orphaned.get((id(totals), key), now)
                if since <= now - ttl_s:
                    del totals[key]
                else:
                    orphans[(id(totals), key)] = since
        self._orphaned = orphans
        self._interned = {k: k for totals in self._all() for k in totals}
        for node in [n for n, t in self.agent_last_report.items() if t < now - ttl_s]:
            del self.agent_last_report[node]

    def _all(self) -> tuple[Totals, ...]:
        return tuple(self.families().values())

    def snapshot(self) -> Snapshot:
        with self.lock:
            if self.before_snapshot is not None:
                self.before_snapshot()
            return {
                "flow_bytes": dict(self.flow_bytes),
                "flow_packets": dict(self.flow_packets),
                "pod_cross_zone": dict(self.pod_cross_zone),
                "zone_bytes": dict(self.zone_bytes),
                "cost": dict(self.cost),
                SERVICE_BYTES: dict(self.service_bytes),
                SAVINGS_BYTES: dict(self.savings_bytes),
                SAVINGS_USD: dict(self.savings_usd),
                "agents": {(n,): t for n, t in self.agent_last_report.items()},
            }

    def snapshot_of(self, *names: str) -> Snapshot:
        """Copies of some families only (the savings tracker's every-few-seconds read)."""
        with self.lock:
            if self.before_snapshot is not None:
                self.before_snapshot()
            families = self.families()
            return {name: dict(families[name]) for name in names}


class AggregatesCollector(Collector):
    """Builds the DESIGN §4 families from a snapshot taken under the lock (by `source` when set: the
    state checkpointer writes what it hands out)."""

    def __init__(self, aggregates: Aggregates, source: Callable[[], Snapshot] | None = None) -> None:
        self._agg = aggregates
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source() if self.source is not None else self._agg.snapshot()
        flow_labels = [schema.prom_label(a) for a in self._agg.flow_labels]
        yield _counter(
            schema.PROM_POD_CROSS_ZONE_BYTES,
            "Bytes each source pod sent to another availability zone (kubezonnet compatible)",
            schema.PROM_POD_CROSS_ZONE_LABELS,
            snap["pod_cross_zone"],
        )
        yield _counter(schema.PROM_FLOW_BYTES, "IP bytes sent, aggregated", flow_labels, snap["flow_bytes"])
        yield _counter(
            schema.PROM_FLOW_PACKETS, "IP packets sent, aggregated", flow_labels, snap["flow_packets"]
        )
        yield _counter(
            schema.PROM_ZONE_TRAFFIC_BYTES,
            "IP bytes sent from one availability zone to another",
            schema.PROM_ZONE_TRAFFIC_LABELS,
            snap["zone_bytes"],
        )
        yield _counter(
            schema.PROM_ESTIMATED_COST,
            "Estimated data transfer cost in US dollars (price table per traffic class and provider)",
            schema.PROM_ESTIMATED_COST_LABELS,
            snap["cost"],
        )
        yield from savings_counters(snap)
        gauge = GaugeMetricFamily(
            schema.ENRICHER_AGENT_LAST_REPORT,
            "Unix time of the last OTLP request from each agent (by resource k8s.node.name)",
            labels=[schema.ENRICHER_AGENT_LAST_REPORT_LABEL],
        )
        for key, value in sorted(snap["agents"].items()):
            gauge.add_metric(list(key), value)
        yield gauge


def _counter(name: str, doc: str, labels: Sequence[str], totals: Mapping[tuple[str, ...], float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(totals.items()):
        family.add_metric(list(key), value)
    return family


class Exposition:
    """The /metrics body, rebuilt from the registry at most once per `max_age_s` (per format).

    A scrape storm costs one rebuild a second, whatever the number of scrapers: concurrent callers wait for
    the rebuild in progress and share its result. Nothing here writes (the checkpoint has its own timer).
    `render` may take tens of milliseconds when it rebuilds (100k series): call it off an event loop.
    """

    def __init__(
        self, registry: CollectorRegistry, max_age_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._registry, self._max_age_s, self._clock = registry, max_age_s, clock
        self._lock = threading.Lock()
        self._built: dict[str, tuple[float, bytes]] = {}  # content type -> (built at, body)
        self.rebuilds = 0

    def render(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) for a request's Accept header (text format or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        with self._lock:
            built = self._built.get(content_type)
            if built is None or self._clock() - built[0] >= self._max_age_s:
                body = encoder(self._registry)
                self.rebuilds += 1
                built = self._built[content_type] = (self._clock(), body)
        return built[1], content_type


# How requests and flow Sums were read (HealthMetrics.count_reads): name, help, the `read` values
_READS: Final = (
    (
        schema.ENRICHER_METRIC_REQUESTS,
        "Metric export requests by how they were read: from their bytes alone (steady) or decoded",
        (schema.READ_BYTES, schema.READ_DECODED),
    ),
    (
        schema.ENRICHER_FLOW_SUMS,
        "kzt.flow.* Sums by how they were read: checked whole against their last shape or point by point",
        (schema.READ_LAYOUT, schema.READ_POINTS),
    ),
)


class HealthMetrics:
    """The enricher's own counters, on the same explicit registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            schema.ENRICHER_RECEIVED_POINTS, "Data points received over OTLP", registry=registry
        )
        self.rejected = Counter(
            schema.ENRICHER_REJECTED_POINTS,
            "Data points rejected (partial success): NaN, negative, missing addresses, wrong kind",
            registry=registry,
        )
        self.export_failures = Counter(
            schema.ENRICHER_EXPORT_FAILURES,
            "Failed export attempts per downstream exporter",
            [schema.ENRICHER_EXPORTER_LABEL],
            registry=registry,
        )
        self.export_dropped = Counter(
            schema.ENRICHER_EXPORT_DROPPED,
            "Requests dropped per downstream exporter (queue full, permanent error, retries exhausted)",
            [schema.ENRICHER_EXPORTER_LABEL],
            registry=registry,
        )
        self.series_dropped = Counter(
            schema.ENRICHER_SERIES_DROPPED,
            "Data points of series not tracked for /metrics because the series cap was reached",
            registry=registry,
        )
        self.metadata_synced = Gauge(
            schema.ENRICHER_METADATA_SYNCED, "1 once Kubernetes metadata has synced", registry=registry
        )
        self.series_active = Gauge(
            schema.ENRICHER_SERIES_ACTIVE, "Series tracked for /metrics aggregation", registry=registry
        )
        # by stage, each exported at 0 from the start: an alert's rate() sees the first failed write
        self.checkpoint_errors = _labelled(
            registry,
            schema.ENRICHER_CHECKPOINT_ERRORS,
            "State checkpoints that could not be loaded (corrupt, unknown version) or written",
            schema.ENRICHER_CHECKPOINT_STAGE_LABEL,
            schema.CHECKPOINT_STAGES,
        )
        self.checkpoint_timestamp = Gauge(
            schema.ENRICHER_CHECKPOINT_TIMESTAMP,
            "Unix time of the last state checkpoint written (--state-file)",
            registry=registry,
        )

        # counters by a label, each value exported at 0 from the start: alerts can use increase()
        self.not_counted = _labelled(
            registry,
            schema.ENRICHER_NOT_COUNTED,
            "Data points the counting rule declined (DESIGN §4), by reason",
            schema.ENRICHER_NOT_COUNTED_REASON_LABEL,
            schema.NOT_COUNTED_REASONS,
        )
        self.counting_evicted = _labelled(
            registry,
            schema.ENRICHER_COUNTING_EVICTED,
            "Counting state given up to a cap: runs per series, tombstones of forgotten series",
            schema.ENRICHER_COUNTING_STATE_LABEL,
            ("run", "tombstone"),
        )
        (self._read_bytes, self._read_decoded), (self._read_layout, self._read_points) = (
            map(_labelled(registry, name, doc, schema.ENRICHER_READ_LABEL, values).labels, values)
            for name, doc, values in _READS
        )

    def count_reads(self, *, from_bytes: bool, layout_sums: int, point_sums: int) -> None:
        """One request's reads (schema.ENRICHER_METRIC_REQUESTS, ENRICHER_FLOW_SUMS)."""
        (self._read_bytes if from_bytes else self._read_decoded).inc()
        if layout_sums:
            self._read_layout.inc(layout_sums)
        if point_sums:
            self._read_points.inc(point_sums)

    def count_declined(self, declined: Mapping[str, int], evicted: Mapping[str, int]) -> None:
        for reason, n in declined.items():
            self.not_counted.labels(reason).inc(n)
        for state, n in evicted.items():
            self.counting_evicted.labels(state).inc(n)

    def bind(self, synced: Callable[[], bool], active: Callable[[], int]) -> None:
        self.metadata_synced.set_function(lambda: 1.0 if synced() else 0.0)
        self.series_active.set_function(lambda: float(active()))


def _labelled(registry: CollectorRegistry, name: str, doc: str, label: str, values: Iterable[str]) -> Counter:
    """A counter by `label`, each of `values` exported (at 0) from the start."""
    counter = Counter(name, doc, [label], registry=registry)
    for value in values:
        counter.labels(value)
    return counter
