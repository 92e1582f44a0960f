"""Hand-encoded protobuf pieces equal the library's; flow-log records; the object path of the core."""

from __future__ import annotations

import io
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO, LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

from otel_kzt import schema
from otel_kzt.enricher.processing.flowlogs import FlowLogWriter, FlowRecords, FlowTemplate
from otel_kzt.enricher.processing.pieces import pieces, received
from otel_kzt.enricher.processing.protowire import AttributeEncoder, Writer, spans, string_attributes, varint
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.schema import TrafficClass
from tests.unit.test_enricher_core import FakeIndex, attrs_of, make_core, request


@pytest.mark.parametrize(
    "value", [0, 1, 127, 128, 300, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 2**32, 2**63 - 1, -1, -(2**63)]
)
def test_varint_and_attributes_match_protobuf(value: int) -> None:
    assert b"\x18" + varint(value) == AnyValue(int_value=value).SerializeToString()
    encoder = AttributeEncoder("kzt.flow.bytes")
    expected = LogRecord(attributes=[KeyValue(key="kzt.flow.bytes", value=AnyValue(int_value=value))])
    assert encoder.int_value(value) == expected.SerializeToString()
    assert encoder.int_values([value, value]) == [expected.SerializeToString()] * 2  # the table's too
    as_double = LogRecord(attributes=[KeyValue(key="kzt.flow.bytes", value=AnyValue(double_value=value / 3))])
    assert encoder.double_value(value / 3) == as_double.SerializeToString()


def test_spans_and_writer_rebuild_the_same_bytes() -> None:
    buf = request([("10.0.0.1", "10.0.0.4", 5, 1), ("10.0.0.2", "10.0.0.4", 6, 1)]).SerializeToString()
    out = Writer()
    for number, start, body, end in spans(buf, 0, len(buf)):
        assert number == 1
        mark = out.open()
        for _inner, inner_start, _inner_body, inner_end in spans(buf, body, end):
            out.add(buf[inner_start:inner_end])
        out.close(buf[start], mark)
    assert out.getvalue() == buf and out.size == len(buf)


def template(cls: TrafficClass = TrafficClass.CROSS_ZONE) -> FlowTemplate:
    attrs = {
        schema.SOURCE_ADDRESS: "10.0.0.1",
        schema.DESTINATION_ADDRESS: "10.0.0.4",
        schema.TRAFFIC_CLASS: cls,
    }
    return FlowTemplate(Resolved(b"", attrs, cls, "aws"), 0.02 / 1e9, json_lines=True, otlp=True)


def test_flow_records_json_and_otlp() -> None:
    records = FlowRecords()
    for resource in (b"node-1", b"node-2"):  # one series key sent by two agents: two flows
        records.add(resource, [(template(), b"key", 1500.0, 1_000_000_000, 3_500_000_000)], is_bytes=True)
        records.add(resource, [(template(), b"key", 1.0, 2_000_000_000, 3_500_000_000)], is_bytes=False)
    lines = [json.loads(line) for line in records.json_lines().decode().splitlines()]
    assert len(lines) == 2
    line = lines[0]
    assert line["event"] == "kzt.flow" and line[schema.TRAFFIC_CLASS] == "cross-zone"
    assert (line["kzt.flow.bytes"], line["kzt.flow.packets"]) == (1500, 1)
    assert line["kzt.estimated_cost_usd"] == pytest.approx(3e-8)
    # the record spans its first increment's interval
    assert (line["kzt.interval.start"], line["kzt.interval.end"]) == (1.0, 3.5)
    logs = ExportLogsServiceRequest.FromString(records.otlp_request())
    resource = {kv.key: kv.value.string_value for kv in logs.resource_logs[0].resource.attributes}
    assert resource[schema.SERVICE_NAME] == schema.ENRICHER_SERVICE_NAME
    otlp = logs.resource_logs[0].scope_logs[0].log_records
    assert len(otlp) == 2 and otlp[0].time_unix_nano == 3_500_000_000
    attrs = {kv.key: kv.value for kv in otlp[0].attributes}
    assert attrs["kzt.flow.bytes"].int_value == 1500 and attrs["kzt.flow.packets"].int_value == 1
    assert attrs["kzt.estimated_cost_usd"].double_value == line["kzt.estimated_cost_usd"]
    assert attrs["kzt.interval.start"].double_value == 1.0
    assert attrs[schema.DESTINATION_ADDRESS].string_value == "10.0.0.4" and otlp[0].event_name == "kzt.flow"


def test_a_flow_log_record_longer_than_the_head_table() -> None:
    attrs = {schema.SOURCE_ADDRESS: "10.0.0.1", schema.DESTINATION_ADDRESS: "x" * 20_000}
    long = FlowTemplate(Resolved(b"", attrs, TrafficClass.EXTERNAL, "aws"), 1e-10, json_lines=True, otlp=True)
    records = FlowRecords()
    for tpl, key in ((long, b"long"), (template(), b"short")):
        records.add(b"node", [(tpl, key, 1e9, 1, 2)], is_bytes=True)
    otlp = (
        ExportLogsServiceRequest.FromString(records.otlp_request()).resource_logs[0].scope_logs[0].log_records
    )
    assert len(otlp) == 2
    short = {kv.key: kv.value for kv in otlp[1].attributes}
    assert short[schema.DESTINATION_ADDRESS].string_value == "10.0.0.4"  # the next record read whole too
    sent = {kv.key: kv.value for kv in otlp[0].attributes}
    assert sent[schema.DESTINATION_ADDRESS].string_value == "x" * 20_000
    assert sent["kzt.flow.bytes"].int_value == 10**9


def test_odd_shaped_points_take_the_object_path_in_order() -> None:
    core, _, registry, sink = make_core(FakeIndex())
    req = request(
        [("10.0.0.1", "10.0.0.4", 5, 1), ("10.0.0.2", "10.0.0.4", 2.5, 1), ("10.0.0.3", "10.0.0.4", 7, 0)]
    )
    # a double value, and a point without start time: both are not the canonical shape
    assert core.consume_metrics(req).rejected == 0
    assert [a[schema.SOURCE_ADDRESS] for a in attrs_of(sink)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert all(a[schema.TRAFFIC_CLASS] == "cross-zone" for a in attrs_of(sink))
    values = [
        dp.as_double or dp.as_int
        for dp in ExportMetricsServiceRequest.FromString(sink.metrics[-1])
        .resource_metrics[0]
        .scope_metrics[0]
        .metrics[0]
        .sum.data_points
    ]
    assert values == [5, 2.5, 7]
    zone = {"source_cloud_availability_zone": "zone-a", "destination_cloud_availability_zone": "zone-b"}
    # the point without a start time cannot tell a reset: a baseline (counted from its next point on)
    assert registry.get_sample_value("kzt_zone_traffic_bytes_total", zone) == 7.5
    assert core.consume_metrics(request([("10.0.0.2", "10.0.0.4", -2.5, 1)])).rejected == 1


def test_flow_logs_pair_bytes_and_packets_per_interval() -> None:
    stream = io.StringIO()
    core, _, _, sink = make_core(FakeIndex(), flow_log=FlowLogWriter(stream))
    both = [("10.0.0.1", "10.0.0.4", 0, 1), ("10.0.0.1", "10.0.0.3", 0, 1)]  # cross-zone and same-zone
    for t, scale in ((2_000_000_000, 1), (4_000_000_000, 3)):
        req = request([(s, d, 1500 * scale, st) for s, d, _, st in both], t=t)
        packets = request([(s, d, scale, st) for s, d, _, st in both], metric=schema.FLOW_PACKETS, t=t)
        req.resource_metrics[0].scope_metrics[0].metrics.append(
            packets.resource_metrics[0].scope_metrics[0].metrics[0]
        )
        core.consume_metrics(req)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["kzt.flow.bytes"], x["kzt.flow.packets"]) for x in lines] == [(1500, 1), (3000, 2)]
    assert all(x[schema.TRAFFIC_CLASS] == "cross-zone" for x in lines)  # same-zone is not billed
    assert lines[1]["kzt.interval.start"] == 2.0 and lines[1]["kzt.interval.end"] == 4.0
    assert lines[0]["kzt.interval.start"] == 1e-9  # a new series: its interval starts at its start time
    assert lines[1]["kzt.estimated_cost_usd"] == pytest.approx(3000 * 0.02 / 1e9)
    logs = ExportLogsServiceRequest.FromString(sink.logs[-1])
    assert len(logs.resource_logs[0].scope_logs[0].log_records) == 1


def test_other_field_orders_and_exemplars_keep_one_series() -> None:
    """A sender that writes attributes first, or attaches exemplars, still gets increments, not totals."""
    from opentelemetry.proto.metrics.v1.metrics_pb2 import Exemplar, NumberDataPoint

    core, _, registry, sink = make_core(FakeIndex())
    pod = {"namespace": "shop", "pod": "web-1"}
    for value, t in ((100, 2_000), (250, 3_000), (400, 4_000)):
        req = request([("10.0.0.1", "10.0.0.4", value, 1)], t=t)
        dp = req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0]
        if value == 250:  # upb order, with exemplars between the value and the attributes
            dp.exemplars.append(Exemplar(time_unix_nano=t, as_int=value))
            raw = req.SerializeToString()
        else:  # attributes first, then start, time, value (same length: only the order differs)
            head = NumberDataPoint(start_time_unix_nano=1, time_unix_nano=t, as_int=value)
            attrs = NumberDataPoint()
            attrs.attributes.extend(dp.attributes)
            reordered = attrs.SerializeToString() + head.SerializeToString()  # concatenation = merge
            raw = req.SerializeToString().replace(dp.SerializeToString(), reordered)
        parsed = type(req).FromString(raw)
        assert core.consume_metrics(parsed, raw=raw).rejected == 0
        assert registry.get_sample_value("pod_cross_zone_network_traffic_bytes_total", pod) == value
    assert core.active_series == 1
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == "cross-zone"


def test_series_first_seen_in_another_shape_then_canonical() -> None:
    core, _, registry, sink = make_core(FakeIndex())
    core.consume_metrics(request([("10.0.0.1", "10.0.0.4", 4, 0)]))  # no start: object path, a baseline
    core.consume_metrics(
        request([("10.0.0.1", "10.0.0.4", 10, 1)], t=3_000)
    )  # canonical: cached header redone
    assert attrs_of(sink)[0][schema.TRAFFIC_CLASS] == "cross-zone"
    dp = (
        ExportMetricsServiceRequest.FromString(sink.metrics[-1])
        .resource_metrics[0]
        .scope_metrics[0]
        .metrics[0]
    )
    assert dp.sum.data_points[0].as_int == 10 and core.active_series == 1
    pod = {"namespace": "shop", "pod": "web-1"}
    assert registry.get_sample_value("pod_cross_zone_network_traffic_bytes_total", pod) == 10  # a new run


def test_string_attributes_are_what_protobuf_writes() -> None:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
    from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

    from otel_kzt.enricher.processing.protowire import string_attributes

    pairs = [("k8s.pod.name", "web-1"), ("zone", ""), ("long", "x" * 300), ("ünï", "cödé ✓")]
    kvs = [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in pairs]
    assert string_attributes(pairs, 0x3A) == NumberDataPoint(attributes=kvs).SerializeToString()
    assert string_attributes(pairs, 0x32) == LogRecord(attributes=kvs).SerializeToString()
    record = LogRecord.FromString(template().otlp_static)  # the flow log's static part parses back whole
    assert {kv.key: kv.value.string_value for kv in record.attributes}[schema.TRAFFIC_CLASS] == "cross-zone"
    assert record.event_name == "kzt.flow" and record.severity_text == "INFO"


_keys = st.sampled_from(
    [schema.SOURCE_ADDRESS, schema.DESTINATION_ADDRESS, schema.SOURCE_POD_NAME, schema.DESTINATION_ZONE,
     schema.TRAFFIC_CLASS, "event", "ünï", "a", "b.c"]
) | st.text(max_size=12)  # fmt: skip
_values = st.sampled_from(["", "10.0.0.1", "x" * 200, "cödé ✓", '"quoted"\\ \n']) | st.text(max_size=150)
_attr_sets = st.dictionaries(_keys, _values, max_size=12)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(_attr_sets, min_size=1, max_size=4), st.sampled_from(TrafficClass))
def test_a_flow_template_is_what_the_libraries_write(
    attr_sets: list[dict[str, str]], cls: TrafficClass
) -> None:
    """Its pieces come from caches (key order, JSON members, fields): the same bytes as orjson and protobuf
    writing the whole record, whatever the keys (one named `event` too) and values, in any key order."""
    for attrs in [*attr_sets, dict(reversed(attr_sets[0].items()))]:
        made = FlowTemplate(Resolved(b"", attrs, cls, "aws"), 1e-11, json_lines=True, otlp=True)
        encoded = pieces(list(attrs.items()))  # the core's way: the pieces it has, in attrs order
        also = FlowTemplate(
            Resolved(b"", attrs, cls, "aws"), 1e-11, json_lines=True, otlp=True, encoded=encoded
        )
        assert (also.json_prefix, also.otlp_static) == (made.json_prefix, made.otlp_static)
        ordered = sorted(attrs.items())
        assert made.json_prefix == orjson.dumps({"event": schema.FLOW_LOG_EVENT_NAME, **dict(ordered)})[:-1]
        head = LogRecord(
            severity_number=SEVERITY_NUMBER_INFO,
            severity_text="INFO",
            event_name=schema.FLOW_LOG_EVENT_NAME,
            body=AnyValue(
                string_value=f"{cls.value} flow {attrs.get(schema.SOURCE_ADDRESS, '?')} -> "
                f"{attrs.get(schema.DESTINATION_ADDRESS, '?')}"
            ),
        )
        assert made.otlp_static == head.SerializeToString() + string_attributes(ordered, 0x32)
        assert (
            LogRecord.FromString(made.otlp_static).attributes
            == LogRecord(
                attributes=[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in ordered]
            ).attributes
        )


_attribute_values = st.one_of(
    st.text(max_size=140).map(lambda v: AnyValue(string_value=v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: AnyValue(int_value=v)),
    st.booleans().map(lambda v: AnyValue(bool_value=v)),
    st.just(AnyValue()),
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.lists(st.tuples(_keys | st.text(max_size=140), _attribute_values), max_size=10),
    st.integers(0, 3),
)
def test_a_series_key_is_read_as_protobuf_reads_it(
    attributes: list[tuple[str, AnyValue]], flags: int
) -> None:
    """`received` reads a series key's attributes without decoding it: exactly the (key, string) pairs
    protobuf decodes, each with its pieces, for what agents write (string values, every field shorter than
    128 bytes, no flags); None for anything else (then the core decodes the point)."""
    point = NumberDataPoint(attributes=[KeyValue(key=k, value=v) for k, v in attributes], flags=flags)
    key = point.SerializeToString()
    readable = not flags and all(
        k
        and v.WhichOneof("value") == "string_value"
        and len(KeyValue(key=k, value=v).SerializeToString()) < 128
        for k, v in attributes
    )  # an empty key is left out by protobuf: another shape
    for _ in range(2):  # made, then from the cache
        got = received(key)
        assert (got is not None) == readable
        if got is not None:
            assert [(p[3], p[4]) for p in got] == [(kv.key, kv.value.string_value) for kv in point.attributes]
            assert b"".join(p[0] for p in got) == key
            assert [p[1:] for p in got] == [p[1:] for p in pieces([(p[3], p[4]) for p in got])]
    assert received(key + b"\x3a") is None and received(key + b"\x3a\x05\x0a") is None  # truncated
    # an empty key written out (protobuf leaves it out): decodable, but not the point's field as protobuf
    # writes it, so not read as a key (the field is then not its own encoding)
    assert received(key + b"\x3a\x07\x0a\x00\x12\x03\x0a\x01x") is None
