"""IP reuse: the enricher names a flow by who owned the address when the point was measured.

The real ClusterIndex with a fake clock: pod A (zone b) owns 10.0.0.5 until it is deleted, pod B (zone a)
takes the address. Points measured before the reuse but received after are A's; points measured after are
B's; a series alternating across the reuse swaps cached namings instead of resolving again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE
from prometheus_client import CollectorRegistry

from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Aggregates, AggregatesCollector, HealthMetrics
from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.processing.cost import load_prices
from otel_kzt.enricher.processing.pieces import Pieces
from otel_kzt.enricher.processing.resolution import Resolved, Resolver
from otel_kzt.k8s.decode import PodRecord, decode_node, decode_pod
from otel_kzt.k8s.index import ClusterIndex
from tests.support.k8s_objects import make_node, make_pod

GRACE_S = 300.0
DELETED_AT, REUSED_AT, RECEIVED_AT = 1100.0, 1110.0, 1120.0
SRC, REUSED = "10.0.0.1", "10.0.0.5"
POD_A = {"k8s.pod.name": "a", "zone": "zone-b", "class": "cross-zone"}
POD_B = {"k8s.pod.name": "b", "zone": "zone-a", "class": "same-zone"}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pod(name: str, node: str, ip: str) -> PodRecord:
    return decode_pod(make_pod(name, node, [ip], owner=("ReplicaSet", f"{name}-5d8f"), uid=f"uid-{name}"))


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def index(clock: Clock) -> ClusterIndex:
    """A owns 10.0.0.5 from 1000, deleted at 1100; B takes it at 1110; the client (zone a) never moves."""
    idx = ClusterIndex(grace_s=GRACE_S, clock=clock)
    idx.register_source("test")
    idx.replace_nodes(
        [
            decode_node(make_node("n-a", ["192.168.0.1"], zone="zone-a")),
            decode_node(make_node("n-b", ["192.168.0.2"], zone="zone-b")),
            decode_node(make_node("n-c", ["192.168.0.3"], zone="zone-a")),
        ]
    )
    idx.upsert_pod(pod("client", "n-c", SRC))
    idx.upsert_pod(pod("a", "n-b", REUSED))
    idx.mark_synced("test")
    clock.now = DELETED_AT
    idx.delete_pod("uid-a")
    clock.now = REUSED_AT
    idx.upsert_pod(pod("b", "n-a", REUSED))
    clock.now = RECEIVED_AT
    return idx


class CountingResolver(Resolver):
    """Counts full resolutions (lookups + encoding): what the per-series cache exists to avoid."""

    resolves = 0

    def resolve_encoded(
        self, given: Mapping[str, str], ready: bool, at_unix_s: float | None = None
    ) -> tuple[Resolved, list[Pieces]]:
        self.resolves += 1
        return super().resolve_encoded(given, ready, at_unix_s)


def make_core(
    index: ClusterIndex, clock: Clock
) -> tuple[Core, CountingResolver, CollectorRegistry, list[bytes]]:
    registry = CollectorRegistry()
    agg = Aggregates(schema.DEFAULT_FLOW_AGGREGATION)
    registry.register(AggregatesCollector(agg))
    resolver = CountingResolver(index, ("10.0.0.0/16",))
    sent: list[bytes] = []

    class Sink:
        def submit_metrics(self, payload: bytes) -> None:
            sent.append(payload)

        def submit_logs(self, payload: bytes) -> None:
            pass  # flow logs are not what these tests look at

    received, clock.now = clock.now, 0.0  # the enricher has run since 0 s: before every flow here began
    core = Core(
        index, resolver, agg, HealthMetrics(registry), load_prices(None, "aws"), sinks=[Sink()], clock=clock
    )
    clock.now = received
    return core, resolver, registry, sent


def send(core: Core, sent: list[bytes], measured_s: float, value: int, start: int = 1) -> dict[str, str]:
    """One bytes point of the series SRC -> REUSED measured at `measured_s`; the attributes it got."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key=schema.RESOURCE_NODE_NAME).value.string_value = "n-a"
    m = rm.scope_metrics.add().metrics.add(name=schema.FLOW_BYTES)
    m.sum.is_monotonic = True
    m.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
    dp = m.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=int(measured_s * 1e9), as_int=value)
    for key, text in ((schema.SOURCE_ADDRESS, SRC), (schema.DESTINATION_ADDRESS, REUSED)):
        dp.attributes.add(key=key).value.string_value = text
    core.consume_metrics(req)
    out = ExportMetricsServiceRequest.FromString(sent[-1])
    point = out.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0]
    return {kv.key: kv.value.string_value for kv in point.attributes}


def named(attrs: dict[str, str]) -> dict[str, str]:
    return {
        "k8s.pod.name": attrs[schema.end_attr(schema.DESTINATION, schema.POD_NAME)],
        "zone": attrs[schema.end_attr(schema.DESTINATION, schema.AVAILABILITY_ZONE)],
        "class": attrs[schema.TRAFFIC_CLASS],
    }


def zone_bytes(registry: CollectorRegistry, zone: str) -> float | None:
    labels = {"source_cloud_availability_zone": "zone-a", "destination_cloud_availability_zone": zone}
    return registry.get_sample_value("kzt_zone_traffic_bytes_total", labels)


def test_point_measured_before_the_reuse_but_received_after_is_named_by_the_old_owner(
    index: ClusterIndex, clock: Clock
) -> None:
    core, _, registry, sent = make_core(index, clock)
    assert named(send(core, sent, 1050.0, 100)) == POD_A  # measured while A held the address
    assert named(send(core, sent, 1115.0, 300)) == POD_B  # measured after B took it
    # The bytes counted so far follow the names: 100 to A's zone, the 200 after to B's.
    assert zone_bytes(registry, "zone-b") == 100
    assert zone_bytes(registry, "zone-a") == 200


def test_in_the_gap_between_delete_and_reuse_the_old_owner_answers_within_grace(
    index: ClusterIndex, clock: Clock
) -> None:
    core, _, _, sent = make_core(index, clock)
    assert named(send(core, sent, 1105.0, 100)) == POD_A  # A deleted at 1100, B not there until 1110


def test_a_series_alternating_across_the_reuse_does_not_thrash(index: ClusterIndex, clock: Clock) -> None:
    core, resolver, registry, sent = make_core(index, clock)
    value = 0
    for i in range(10):  # a late batch and new reports interleaved, as a Collector queue can deliver them
        value += 10
        before = named(send(core, sent, 1050.0 + i, value))
        value += 10
        after = named(send(core, sent, 1115.0 + i, value))
        assert (before, after) == (POD_A, POD_B)
    assert resolver.resolves == 2  # one per owner; every later switch reuses a naming kept aside
    # Every increment was counted once, under the owner at its measurement time.
    assert (zone_bytes(registry, "zone-b") or 0) + (zone_bytes(registry, "zone-a") or 0) == value


def test_a_metadata_change_re_resolves_and_keeps_the_history(index: ClusterIndex, clock: Clock) -> None:
    core, resolver, _, sent = make_core(index, clock)
    assert named(send(core, sent, 1115.0, 10)) == POD_B
    index.upsert_pod(pod("other", "n-b", "10.0.0.9"))  # new generation
    assert named(send(core, sent, 1050.0, 20)) == POD_A
    assert named(send(core, sent, 1116.0, 30)) == POD_B
    assert resolver.resolves == 2  # B's naming rechecked (same answer) after the change, not re-encoded


def test_time_less_callers_get_the_owner_now(index: ClusterIndex) -> None:
    resolver = Resolver(index)
    given = {schema.SOURCE_ADDRESS: SRC, schema.DESTINATION_ADDRESS: REUSED}
    pod_name = schema.end_attr(schema.DESTINATION, schema.POD_NAME)
    assert resolver.resolve(given, True).attrs[pod_name] == "b"
    assert resolver.resolve(given, True, 1050.0).attrs[pod_name] == "a"
    assert resolver.resolve(given, True).attrs[pod_name] == "b"  # the cached window does not leak


def test_lookup_window_bounds_each_answer(index: ClusterIndex) -> None:
    a_until = math.nextafter(DELETED_AT + GRACE_S, math.inf)
    endpoint, lo, hi = index.lookup_window(REUSED, 1050.0)
    assert endpoint is not None and endpoint.pod_name == "a" and (lo, hi) == (-math.inf, REUSED_AT)
    endpoint, lo, hi = index.lookup_window(REUSED, 1115.0)
    assert endpoint is not None and endpoint.pod_name == "b" and (lo, hi) == (REUSED_AT, math.inf)
    endpoint, lo, hi = index.lookup_window(SRC, 1.0)  # never reused: one answer for every time
    assert endpoint is not None and (lo, hi) == (-math.inf, math.inf)
    assert index.lookup_window("10.9.9.9") == (None, -math.inf, math.inf)
    # Every answer agrees with lookup at the same time, at and around the window edges.
    for t in (0.0, 1099.0, DELETED_AT, REUSED_AT - 1e-6, REUSED_AT, 1115.0, a_until, 5000.0):
        assert index.lookup_window(REUSED, t)[0] == index.lookup(REUSED, t)


def test_released_address_window_ends_with_the_grace_period(clock: Clock) -> None:
    idx = ClusterIndex(grace_s=GRACE_S, clock=clock)
    idx.register_source("test")
    idx.upsert_pod(pod("gone", "n-a", "10.0.0.7"))
    idx.mark_synced("test")
    idx.delete_pod("uid-gone", now=2000.0)
    endpoint, lo, hi = idx.lookup_window("10.0.0.7", 2100.0)
    assert endpoint is not None and lo == -math.inf and 2000.0 + GRACE_S < hi < 2000.0 + GRACE_S + 1e-6
    assert idx.lookup_window("10.0.0.7", 2000.0 + GRACE_S + 1)[0] is None


def test_kept_naming_from_an_older_generation_is_rechecked_not_trusted(
    index: ClusterIndex, clock: Clock
) -> None:
    core, resolver, _, sent = make_core(index, clock)
    assert named(send(core, sent, 1050.0, 10)) == POD_A
    assert named(send(core, sent, 1115.0, 20)) == POD_B
    clock.now = 1130.0  # B goes, C (zone b) takes the address: a new generation
    index.delete_pod("uid-b")
    clock.now = 1140.0
    index.upsert_pod(pod("c", "n-b", REUSED))
    assert named(send(core, sent, 1116.0, 30)) == POD_B  # still B's for that time: B's naming rechecked
    assert named(send(core, sent, 1050.0, 40)) == POD_A  # A's kept naming rechecked, still right
    assert resolver.resolves == 2
    assert named(send(core, sent, 1145.0, 50)) == {**POD_A, "k8s.pod.name": "c"}  # a new owner: resolved
    assert resolver.resolves == 3
