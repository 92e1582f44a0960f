"""The hand-built OTLP wire bytes equal what opentelemetry-proto's classes serialize for the same message."""

from __future__ import annotations

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2

from otel_kzt import schema
from otel_kzt.agent.encode import (
    RequestEncoder,
    attributes,
    gauge_metric,
    point_head,
    sum_metric,
    varint,
)
from otel_kzt.agent.flows import FlowCounters

RESOURCE = {schema.SERVICE_NAME: schema.AGENT_SERVICE_NAME, schema.RESOURCE_NODE_NAME: "n1"}
T = 1_700_000_000_123_456_789


def _kv(key: str, value: str | int | float) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(double_value=value))


def _flow_attrs(i: int) -> list[tuple[str, str | int]]:
    attrs: list[tuple[str, str | int]] = [
        (schema.SOURCE_ADDRESS, f"10.0.{i // 250}.{i % 250}"),
        (schema.DESTINATION_ADDRESS, "fd00::5"),
        (schema.NETWORK_TRANSPORT, "tcp"),
    ]
    if i % 2:
        attrs.append((schema.DESTINATION_PORT, 443 + i))
    return attrs


def _reference(flows: list[tuple[list[tuple[str, str | int]], int, int, int]]) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    rm.resource.attributes.extend(_kv(k, v) for k, v in RESOURCE.items())
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = "otel-kzt", "0.1.0"
    for name, desc, unit, column in (
        (schema.FLOW_BYTES, schema.FLOW_BYTES_DESCRIPTION, schema.FLOW_BYTES_UNIT, 2),
        (schema.FLOW_PACKETS, schema.FLOW_PACKETS_DESCRIPTION, schema.FLOW_PACKETS_UNIT, 3),
    ):
        metric = sm.metrics.add(name=name, description=desc, unit=unit)
        metric.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
        metric.sum.is_monotonic = True
        for flow in flows:
            point = metric.sum.data_points.add(start_time_unix_nano=flow[1], time_unix_nano=T)
            point.as_int = flow[column]
            point.attributes.extend(_kv(k, v) for k, v in flow[0])
    return request


def _flows(n: int) -> list[tuple[list[tuple[str, str | int]], int, int, int]]:
    return [(_flow_attrs(i), T - 10**9 * (i + 1), 1500 * i + 7, i + 1) for i in range(n)]


def _encode(flows: list[tuple[list[tuple[str, str | int]], int, int, int]], **kw: int) -> list[bytes]:
    encoder = RequestEncoder(RESOURCE, "otel-kzt", "0.1.0", **kw)
    heads = [point_head(a, start) for a, start, _, _ in flows]
    counts = [FlowCounters(b, p, 0, 0) for _, _, b, p in flows]
    return list(encoder.encode(heads, counts, T))


def test_varint_matches_protobuf() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1, -1):
        p = metrics_pb2.NumberDataPoint(attributes=[_kv("k", value)])
        assert varint(value) in p.SerializeToString()


def test_request_is_byte_identical_to_reference() -> None:
    flows = _flows(300)
    [ours] = _encode(flows)
    reference = _reference(flows)
    assert ours == reference.SerializeToString(deterministic=True)
    decoded = ExportMetricsServiceRequest.FromString(ours)
    assert decoded == reference


def test_large_values_and_big_counts_round_trip() -> None:
    flows = [(_flow_attrs(1), T - 1, 2**62 + 5, 2**40)]
    [ours] = _encode(flows)
    point = ExportMetricsServiceRequest.FromString(ours).resource_metrics[0].scope_metrics[0].metrics[0]
    assert point.sum.data_points[0].as_int == 2**62 + 5


def test_split_by_points_keeps_every_flow_once() -> None:
    flows = _flows(1001)
    requests = _encode(flows, max_points=200)
    assert len(requests) == 11  # 200 points = 100 flows (bytes + packets) per request
    seen: list[str] = []
    for raw in requests:
        request = ExportMetricsServiceRequest.FromString(raw)
        assert request.resource_metrics[0].resource.attributes[1].value.string_value == "n1"
        metrics = request.resource_metrics[0].scope_metrics[0].metrics
        assert [m.name for m in metrics] == [schema.FLOW_BYTES, schema.FLOW_PACKETS]
        assert len(metrics[0].sum.data_points) == len(metrics[1].sum.data_points) <= 100
        seen += [p.attributes[0].value.string_value for p in metrics[0].sum.data_points]
    assert seen == [a[0][1] for a, *_ in flows]


def test_split_by_bytes() -> None:
    flows = _flows(2000)
    requests = _encode(flows, max_points=100_000, max_bytes=64 * 1024)
    assert len(requests) > 3
    assert all(len(r) <= 64 * 1024 + 512 for r in requests)
    total = sum(
        len(
            ExportMetricsServiceRequest.FromString(r)
            .resource_metrics[0]
            .scope_metrics[0]
            .metrics[1]
            .sum.data_points
        )
        for r in requests
    )
    assert total == 2000


def test_split_by_bytes_cuts_where_the_next_point_would_pass_the_budget() -> None:
    """Heads in pieces (own attributes, common, both pods; some empty), cut by bytes: each request is the
    reference message of its flows, byte for byte, and holds as many as fit in half the byte budget (one
    metric's points); a point bigger than that goes alone."""
    flows = _flows(400)
    flows[7] = ([*flows[7][0], (schema.SOURCE_POD_NAME, "p" * 9000)], *flows[7][1:])
    pieces = [
        (attributes(7, a[:2]), attributes(7, a[2:3]), attributes(7, a[3:]), b"")
        if i % 3
        else (attributes(7, a), b"", b"", b"")
        for i, (a, *_) in enumerate(flows)
    ]
    heads = [
        point_head(own, start, source, destination, common=common)
        for (own, common, source, destination), (_, start, _, _) in zip(pieces, flows, strict=True)
    ]
    counts = [FlowCounters(b, p, 0, 0) for _, _, b, p in flows]
    budget = 8 * 1024
    encoder = RequestEncoder(RESOURCE, "otel-kzt", "0.1.0", max_points=100_000, max_bytes=2 * budget)
    start = 0
    for raw in encoder.encode(heads, counts, T):
        end = start + len(
            ExportMetricsServiceRequest.FromString(raw)
            .resource_metrics[0]
            .scope_metrics[0]
            .metrics[0]
            .sum.data_points
        )
        assert raw == _reference(flows[start:end]).SerializeToString(deterministic=True)
        size = sum(h.size for h in heads[start:end])
        assert size <= budget or end == start + 1
        assert end == len(flows) or size + heads[end].size > budget
        start = end
    assert start == len(flows)


def test_empty_export_still_carries_extra_metrics() -> None:
    encoder = RequestEncoder(RESOURCE, "otel-kzt", "0.1.0")
    extra = [
        gauge_metric("kzt.agent.flow_map.fill_ratio", "fill", "1", [((), 0.25)], T),
        sum_metric("kzt.agent.exports", "exports", "{request}", [([("result", "ok")], T - 5, 3)], T),
    ]
    [raw] = list(encoder.encode([], [], T, extra))
    metrics = ExportMetricsServiceRequest.FromString(raw).resource_metrics[0].scope_metrics[0].metrics
    assert [m.name for m in metrics] == ["kzt.agent.flow_map.fill_ratio", "kzt.agent.exports"]
    assert metrics[0].gauge.data_points[0].as_double == 0.25
    assert metrics[0].gauge.data_points[0].time_unix_nano == T
    assert metrics[1].sum.data_points[0].as_int == 3
    assert metrics[1].sum.is_monotonic
    assert metrics[1].sum.data_points[0].attributes[0] == _kv("result", "ok")
