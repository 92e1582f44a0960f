"""The enrichment core against a small fake MetadataIndex: classes, attributes, increments, rejects."""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    AGGREGATION_TEMPORALITY_DELTA,
)
from prometheus_client import CollectorRegistry

from otel_kzt import gctune, schema
from otel_kzt.enricher.exporters.prometheus import Aggregates, AggregatesCollector, HealthMetrics
from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.processing.cost import load_prices
from otel_kzt.enricher.processing.resolution import Resolver
from otel_kzt.enricher.state.series import series_key
from otel_kzt.errors import Overloaded
from otel_kzt.k8s.model import Endpoint, NodeInfo
from otel_kzt.schema import TrafficClass, WorkloadKind

NODES = {
    "n-a1": NodeInfo("n-a1", "zone-a", "region-1", "aws", ("192.168.0.1",)),
    "n-a2": NodeInfo("n-a2", "zone-a", "region-1", "aws", ("192.168.0.2",)),
    "n-b1": NodeInfo("n-b1", "zone-b", "region-1", "aws", ("192.168.0.3",)),
    "n-r2": NodeInfo("n-r2", "zone-c", "region-2", "aws", ("192.168.0.4",)),
    "n-nz": NodeInfo("n-nz", None, None, None, ("192.168.0.5",)),
}
PODS = {
    "10.0.0.1": Endpoint("n-a1", WorkloadKind.DEPLOYMENT, "web", "web-1", "shop", "uid-web-1"),
    "10.0.0.2": Endpoint("n-a1", WorkloadKind.STATEFULSET, "db", "db-0", "shop", "uid-db-0"),
    "10.0.0.3": Endpoint("n-a2", WorkloadKind.DEPLOYMENT, "api", "api-1", "shop", "uid-api-1"),
    "10.0.0.4": Endpoint("n-b1", WorkloadKind.DEPLOYMENT, "cache", "cache-1", "shop", "uid-cache-1"),
    "10.0.0.5": Endpoint("n-r2", WorkloadKind.JOB, "etl", "etl-x", "batch", "uid-etl"),
    "10.0.0.6": Endpoint("n-nz", WorkloadKind.POD, "bare", "bare", "default", "uid-bare"),
    "192.168.0.3": Endpoint("n-b1", WorkloadKind.NODE, "n-b1"),
}


class FakeIndex:
    """A MetadataIndex over two dicts; `ready` and `generation` are settable."""

    def __init__(self, ready: bool = True) -> None:
        self.is_ready = ready
        self.gen = 1
        self.pods = dict(PODS)

    def ready(self) -> bool:
        return self.is_ready

    @property
    def generation(self) -> int:
        return self.gen

    def lookup(self, address: str, at_unix_s: float | None = None) -> Endpoint | None:
        return self.pods.get(address) if self.is_ready else None

    def node(self, name: str) -> NodeInfo | None:
        return NODES.get(name)


class ListSink:
    def __init__(self) -> None:
        self.metrics: list[bytes] = []
        self.logs: list[bytes] = []

    def submit_metrics(self, payload: bytes) -> None:
        self.metrics.append(payload)

    def submit_logs(self, payload: bytes) -> None:
        self.logs.append(payload)


def make_core(index: FakeIndex, **kw: object) -> tuple[Core, Aggregates, CollectorRegistry, ListSink]:
    """A core over `index`; unless a clock is given it reads 0 s: the enricher started at the epoch, before
    every run these tests send (runs from before a start-up are baselines: test_enricher_counting.py)."""
    kw.setdefault("clock", lambda: 0.0)
    registry = CollectorRegistry()
    agg = Aggregates(schema.DEFAULT_FLOW_AGGREGATION)
    registry.register(AggregatesCollector(agg))
    health = HealthMetrics(registry)
    sink = ListSink()
    core = Core(
        index,
        Resolver(index, kw.pop("cidrs", ("10.0.0.0/16",))),  # type: ignore[arg-type]
        agg,
        health,
        load_prices(None, "aws"),
        sinks=[sink],
        **kw,  # type: ignore[arg-type]
    )
    return core, agg, registry, sink


Point = tuple[str, str, float, int]  # src, dst, value, start


def request(
    points: Iterable[Point], metric: str = schema.FLOW_BYTES, node: str = "n-a1", t: int = 2_000, **extra: str
) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key=schema.RESOURCE_NODE_NAME).value.string_value = node
    m = rm.scope_metrics.add().metrics.add(name=metric)
    m.sum.is_monotonic = True
    m.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
    for src, dst, value, start in points:
        dp = m.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=t)
        if isinstance(value, float):
            dp.as_double = value
        else:
            dp.as_int = value
        attrs = {schema.SOURCE_ADDRESS: src, schema.DESTINATION_ADDRESS: dst, **extra}
        for k, v in attrs.items():
            if v:
                dp.attributes.add(key=k).value.string_value = v
    return req


def forwarded(sink: ListSink) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest.FromString(sink.metrics[-1])


def attrs_of(sink: ListSink) -> list[dict[str, str]]:
    dps = forwarded(sink).resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
    return [{kv.key: kv.value.string_value for kv in dp.attributes} for dp in dps]


@pytest.mark.parametrize(
    ("src", "dst", "cls"),
    [
        ("10.0.0.1", "10.0.0.2", TrafficClass.SAME_NODE),
        ("10.0.0.1", "10.0.0.3", TrafficClass.SAME_ZONE),
        ("10.0.0.1", "10.0.0.4", TrafficClass.CROSS_ZONE),
        ("10.0.0.1", "192.168.0.3", TrafficClass.CROSS_ZONE),  # host-network end: a node
        ("10.0.0.1", "10.0.0.5", TrafficClass.CROSS_REGION),
        ("10.0.0.1", "8.8.8.8", TrafficClass.EXTERNAL),
        ("10.0.0.1", "10.0.99.9", TrafficClass.UNKNOWN),  # inside the cluster CIDR, not known
        ("10.0.0.1", "10.0.0.6", TrafficClass.UNKNOWN),  # destination node has no zone
    ],
)
def test_traffic_class(src: str, dst: str, cls: TrafficClass) -> None:
    core, _, _, sink = make_core(FakeIndex())
    req = request([(src, dst, 10, 1)])
    assert core.consume_metrics(req).rejected == 0
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == cls.value


def test_both_ends_filled_and_sender_values_kept() -> None:
    core, _, _, sink = make_core(FakeIndex())
    req = request([("10.0.0.1", "192.168.0.3", 10, 1)], **{schema.SOURCE_POD_NAME: "agent-said"})
    core.consume_metrics(req)
    a = attrs_of(sink)[0]
    assert a[schema.SOURCE_POD_NAME] == "agent-said"  # kept, not overridden, not duplicated
    assert list(k for k in a if k == schema.SOURCE_POD_NAME) == [schema.SOURCE_POD_NAME]
    assert a[schema.SOURCE_NAMESPACE_NAME] == "shop"
    assert a[schema.SOURCE_WORKLOAD_KIND] == "Deployment" and a[schema.SOURCE_WORKLOAD_NAME] == "web"
    assert a[schema.SOURCE_ZONE] == "zone-a" and a[schema.SOURCE_REGION] == "region-1"
    assert a[schema.DESTINATION_WORKLOAD_KIND] == "Node" and a[schema.DESTINATION_WORKLOAD_NAME] == "n-b1"
    assert schema.DESTINATION_POD_NAME not in a
    assert a[schema.DESTINATION_ZONE] == "zone-b"


def test_not_ready_marks_unknown_then_resolves_when_ready() -> None:
    index = FakeIndex(ready=False)
    core, _, _, sink = make_core(index)
    req = request([("10.0.0.1", "10.0.0.4", 10, 1)])
    core.consume_metrics(req)
    assert attrs_of(sink)[0] == {
        schema.SOURCE_ADDRESS: "10.0.0.1",
        schema.DESTINATION_ADDRESS: "10.0.0.4",
        schema.TRAFFIC_CLASS: "unknown",
    }
    index.is_ready = True
    req = request([("10.0.0.1", "10.0.0.4", 20, 1)])
    core.consume_metrics(req)
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == "cross-zone"


def test_generation_change_re_resolves_cached_series() -> None:
    index = FakeIndex()
    core, _, _, sink = make_core(index)
    core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 10, 1)]))
    index.pods["10.0.0.4"] = PODS["10.0.0.3"]  # the IP now belongs to a same-zone pod
    req = request([("10.0.0.1", "10.0.0.4", 20, 1)])
    core.consume_metrics(req)
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == "cross-zone"  # cached: generation unchanged
    index.gen += 1
    req = request([("10.0.0.1", "10.0.0.4", 30, 1)])
    core.consume_metrics(req)
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == "same-zone"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_increments_survive_agent_restart_and_stay_monotonic() -> None:
    core, _, registry, _ = make_core(FakeIndex())
    pod = {"namespace": "shop", "pod": "web-1"}
    name = schema.PROM_POD_CROSS_ZONE_BYTES + "_total"
    for value, start, want in [(100, 1, 100), (250, 1, 250), (40, 9, 290), (90, 9, 340), (30, 9, 340)]:
        # (40, new start) = agent restart; (30, same start, lower): stale, nothing (a reset has a new start)
        core.consume_metrics(request([("10.0.0.1", "10.0.0.4", value, start)]))
        assert sample(registry, name, **pod) == want


def test_aggregates_sum_member_series_and_cost() -> None:
    core, _, registry, _ = make_core(FakeIndex())
    core.consume_metrics(
        request(
            [("10.0.0.1", "10.0.0.4", 1_000_000_000, 1), ("10.0.0.2", "10.0.0.4", 500, 1)],
            **{schema.DESTINATION_PORT: "443"},
        )
    )
    core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 7, 1)], metric=schema.FLOW_PACKETS))
    zone = {"source_cloud_availability_zone": "zone-a", "destination_cloud_availability_zone": "zone-b"}
    assert sample(registry, "kzt_zone_traffic_bytes_total", **zone) == 1_000_000_500
    cost = {
        "source_k8s_namespace_name": "shop",
        "source_k8s_workload_kind": "Deployment",
        "source_k8s_workload_name": "web",
        "kzt_traffic_class": "cross-zone",
    }
    assert sample(registry, "kzt_estimated_cost_usd_total", **cost) == pytest.approx(0.02)
    flow = {schema.prom_label(a): "" for a in schema.DEFAULT_FLOW_AGGREGATION}
    flow.update(
        source_k8s_namespace_name="shop",
        source_k8s_workload_kind="Deployment",
        source_k8s_workload_name="web",
        source_cloud_availability_zone="zone-a",
        destination_k8s_namespace_name="shop",
        destination_k8s_workload_kind="Deployment",
        destination_k8s_workload_name="cache",
        destination_cloud_availability_zone="zone-b",
        kzt_traffic_class="cross-zone",
    )
    assert sample(registry, "kzt_flow_bytes_total", **flow) == 1_000_000_000
    assert sample(registry, "kzt_flow_packets_total", **flow) == 7
    assert sample(registry, "kzt_enricher_agent_last_report_timestamp_seconds", k8s_node_name="n-a1") == 0


def test_rejects_nan_negative_and_missing_address_but_keeps_the_rest() -> None:
    core, _, registry, sink = make_core(FakeIndex())
    req = request(
        [
            ("10.0.0.1", "10.0.0.4", 5, 1),
            ("10.0.0.1", "10.0.0.3", math.nan, 1),
            ("10.0.0.1", "10.0.0.2", -3, 1),
            ("10.0.0.1", "", 4, 1),
        ]
    )
    outcome = core.consume_metrics(req)
    assert outcome.rejected == 3
    assert "NaN or negative" in outcome.message and "missing source.address" in outcome.message
    assert [a[schema.DESTINATION_ADDRESS] for a in attrs_of(sink)] == ["10.0.0.4"]
    assert sample(registry, "kzt_enricher_rejected_data_points_total") == 3
    assert sample(registry, "kzt_enricher_received_data_points_total") == 4
    forwarded = ExportMetricsServiceRequest.FromString(sink.metrics[-1])
    assert len(forwarded.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points) == 1


def test_wrong_kind_flow_metric_refused_whole_and_unknown_metric_passes_untouched() -> None:
    core, _, _, sink = make_core(FakeIndex())
    req = request([("10.0.0.1", "10.0.0.4", 5, 1)])
    req.resource_metrics[0].scope_metrics[0].metrics[
        0
    ].sum.aggregation_temporality = AGGREGATION_TEMPORALITY_DELTA
    other = req.resource_metrics[0].scope_metrics[0].metrics.add(name="app.requests")
    other.gauge.data_points.add(as_int=3).attributes.add(
        key=schema.SOURCE_ADDRESS
    ).value.string_value = "10.0.0.1"
    before = other.SerializeToString()
    outcome = core.consume_metrics(req)
    assert outcome.rejected == 1 and "cumulative monotonic Sum" in outcome.message
    forwarded = ExportMetricsServiceRequest.FromString(sink.metrics[-1])
    metrics = forwarded.resource_metrics[0].scope_metrics[0].metrics
    assert [m.name for m in metrics] == ["app.requests"]
    assert metrics[0].SerializeToString() == before


def test_series_cap_counts_and_still_forwards() -> None:
    core, _, registry, sink = make_core(FakeIndex(), max_series=2)
    req = request(
        [("10.0.0.1", "10.0.0.4", 5, 1), ("10.0.0.2", "10.0.0.4", 5, 1), ("10.0.0.3", "10.0.0.4", 5, 1)]
    )
    core.consume_metrics(req)
    assert core.active_series == 2
    assert sample(registry, "kzt_enricher_series_dropped_total") == 1
    assert all(schema.TRAFFIC_CLASS in a for a in attrs_of(sink))


def test_idle_series_dropped_after_ttl_aggregates_of_live_series_kept() -> None:
    now = [0.0]
    core, _, registry, _ = make_core(FakeIndex(), series_ttl_s=60.0, clock=lambda: now[0])
    now[0] = 1000.0
    core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 5, 1), ("10.0.0.2", "10.0.0.4", 6, 1)]))
    name = "pod_cross_zone_network_traffic_bytes_total"
    for step in range(1, 9):
        now[0] += 20
        core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 5 + step, 1)]))
        if step == 4:  # db-0's series is forgotten; its counter stays for another TTL
            assert core.active_series == 1
            assert sample(registry, name, namespace="shop", pod="db-0") == 6
    assert sample(registry, name, namespace="shop", pod="web-1") == 13
    assert sample(registry, name, namespace="shop", pod="db-0") is None


def test_overloaded_when_no_slot_free() -> None:
    core, *_ = make_core(FakeIndex(), max_inflight=1)
    core._slots.acquire()  # one request in flight
    with pytest.raises(Overloaded):
        core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 5, 1)]))


def test_series_key_ignores_time_and_value_only() -> None:
    a = request([("10.0.0.1", "10.0.0.4", 5, 1)], t=10)
    b = request([("10.0.0.1", "10.0.0.4", 9.5, 3)], t=20)
    c = request([("10.0.0.1", "10.0.0.3", 5, 1)], t=10)
    dp = lambda r: r.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0]  # noqa: E731
    assert series_key(dp(a).SerializeToString()) == series_key(dp(b).SerializeToString())
    assert series_key(dp(a).SerializeToString()) != series_key(dp(c).SerializeToString())


def test_generation_change_without_changed_answers_skips_re_resolution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = FakeIndex()
    core, _, _, sink = make_core(index)
    core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 10, 1)]))
    index.gen += 1  # some other pod changed
    monkeypatch.setattr(
        core._points._resolver, "resolve_encoded", lambda *a: pytest.fail("re-resolved an unchanged series")
    )
    core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 20, 1)]))
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == "cross-zone"


def test_agent_encoding_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract with the agent: its hand-built requests are in the canonical shape."""
    from dataclasses import dataclass

    from otel_kzt.agent.encode import RequestEncoder, point_head

    @dataclass
    class Counts:
        bytes: int
        packets: int

    core, _, registry, sink = make_core(FakeIndex())
    monkeypatch.setattr(
        core._points, "_odd_point", lambda *a: pytest.fail("agent point took the object path")
    )
    encoder = RequestEncoder({schema.RESOURCE_NODE_NAME: "n-a1"}, "otel_kzt.agent", "0.1.0")
    attrs = [
        (schema.SOURCE_ADDRESS, "10.0.0.1"),
        (schema.DESTINATION_ADDRESS, "10.0.0.4"),
        (schema.NETWORK_TRANSPORT, "tcp"),
        (schema.DESTINATION_PORT, 443),
    ]
    head = point_head(attrs, 1_000)
    for value, t in ((3_000, 2_000), (7_500, 3_000)):
        for payload in encoder.encode([head], [Counts(value, value // 1500)], t):
            assert (
                core.consume_metrics(ExportMetricsServiceRequest.FromString(payload), raw=payload).rejected
                == 0
            )
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == "cross-zone"
    assert (
        sample(registry, "pod_cross_zone_network_traffic_bytes_total", namespace="shop", pod="web-1") == 7_500
    )


def test_agent_upgrade_continues_its_series() -> None:
    """A new service.version (or host.name) on the same node keeps the series: no double counting."""
    core, _, registry, _ = make_core(FakeIndex())
    for value, version in ((100, "0.1.0"), (180, "0.2.0")):
        req = request([("10.0.0.1", "10.0.0.4", value, 1)])
        req.resource_metrics[0].resource.attributes.add(
            key=schema.SERVICE_VERSION
        ).value.string_value = version
        core.consume_metrics(req)
    assert (
        sample(registry, "pod_cross_zone_network_traffic_bytes_total", namespace="shop", pod="web-1") == 180
    )
    assert core.active_series == 1
    other_node = request([("10.0.0.1", "10.0.0.4", 50, 1)], node="n-a2")  # another sender: its own series
    core.consume_metrics(other_node)
    assert core.active_series == 2


def test_late_older_report_adds_nothing() -> None:
    core, _, registry, _ = make_core(FakeIndex())
    pod = {"namespace": "shop", "pod": "web-1"}
    for value, t in ((100, 2_000), (150, 4_000), (100, 3_000), (170, 5_000)):  # (100, 3000) arrives late
        core.consume_metrics(request([("10.0.0.1", "10.0.0.4", value, 1)], t=t))
    assert sample(registry, "pod_cross_zone_network_traffic_bytes_total", **pod) == 170


def test_bytes_and_packets_of_a_flow_are_named_once_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two metrics of one flow carry the same attributes: one resolution names both series (and
    they share its flow-log template), each aggregated where its metric goes."""
    core, _, registry, sink = make_core(FakeIndex())
    resolver = core._points._resolver
    calls: list[object] = []
    real = resolver.resolve_encoded
    monkeypatch.setattr(resolver, "resolve_encoded", lambda *a: calls.append(a) or real(*a))
    req = request([("10.0.0.1", "10.0.0.4", 3_000, 1), ("10.0.0.1", "10.0.0.5", 900, 1)])
    packets = request([("10.0.0.1", "10.0.0.4", 2, 1), ("10.0.0.1", "10.0.0.5", 1, 1)], schema.FLOW_PACKETS)
    req.resource_metrics[0].scope_metrics[0].metrics.append(
        packets.resource_metrics[0].scope_metrics[0].metrics[0]
    )
    assert core.consume_metrics(req).rejected == 0
    assert len(calls) == 2  # one per flow, not per series
    groups = core._table.groups.values()
    templates = [s.template for table in groups for s in table.values()]
    assert len(templates) == 4 and len({id(t) for t in templates}) == 2
    pod = {"namespace": "shop", "pod": "web-1"}
    assert sample(registry, "pod_cross_zone_network_traffic_bytes_total", **pod) == 3_900  # both billed
    records = [
        {kv.key: kv.value.int_value for kv in r.attributes if kv.value.HasField("int_value")}
        for r in ExportLogsServiceRequest.FromString(sink.logs[0]).resource_logs[0].scope_logs[0].log_records
    ]
    counts = sorted((r[schema.FLOW_LOG_BYTES], r[schema.FLOW_LOG_PACKETS]) for r in records)
    assert counts == [(900, 1), (3_000, 2)]  # each flow's bytes and packets paired in one record


@pytest.mark.parametrize("new", [63, 64])
def test_a_request_of_many_new_series_sets_them_aside_until_one_of_few(new: int) -> None:
    """64 new series in a request make it part of a burst (gctune.burst: what it allocated is kept out of
    young garbage collections); the next request, of the same series, ends it."""
    gctune.burst(False)
    try:
        core, *_ = make_core(FakeIndex())
        flows = [("10.0.0.1", f"10.1.0.{i}", 10, 1) for i in range(new)]
        core.consume_metrics(request(flows))
        assert (gc.get_freeze_count() > 0) == (new >= 64)
        core.consume_metrics(request([(s, d, 20, start) for s, d, _, start in flows], t=3_000))
        assert gc.get_freeze_count() == 0
        assert core.active_series == new
    finally:
        gctune.burst(False)
