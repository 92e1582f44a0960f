"""Protobuf field order is free on the wire: a point whose start, time and integer value come first but
with more than its attributes and flags after them (exemplars, a field written again, flags or an explicit
zero between attributes) is counted and re-exported as the same point in field-number order would be.

The steady path names a point by the bytes after its 27-byte prefix. If those bytes held an exemplar or a
second time, they would change every interval: a new series each time, each point counted whole (a silent
over-count), or a value read from the wrong copy. Hypothesis writes each series' fields in drawn orders,
over several intervals, to one core; its twin gets the same request as protobuf re-encodes it; both must
agree with each other and with the truth (each flow's last cumulative value, counted once).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping

from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    Exemplar,
    Metric,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from otel_kzt import schema
from otel_kzt.enricher.processing.flowlogs import FlowLogWriter
from otel_kzt.enricher.processing.protowire import varint
from tests.unit.test_enricher_core import FakeIndex, make_core
from tests.unit.test_enricher_repeats import FLOWS, HOW_READ, PROPERTIES

START = 1_000
METRICS = ((schema.FLOW_BYTES, 1500), (schema.FLOW_PACKETS, 1))
CANONICAL = ("start", "time", "value", "attr0", "attr1", "attr2")
DECOY = {"start": 3, "time": -1, "value": 7}  # added to the first of two copies (protobuf keeps the last)
# How one series' points are written: its fields in order, flags (None: none written), an integer port
Style = tuple[tuple[str, ...], int | None, bool]


def ld(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + varint(len(body)) + body


def point(style: Style, src: str, dst: str, t: int, value: int, *, start: int = START) -> bytes:
    """One NumberDataPoint, its fields written in the style's order."""
    order, flags, int_port = style
    port = AnyValue(int_value=443) if int_port else AnyValue(string_value="443")
    attrs = [
        KeyValue(key=schema.SOURCE_ADDRESS, value=AnyValue(string_value=src)),
        KeyValue(key=schema.DESTINATION_ADDRESS, value=AnyValue(string_value=dst)),
        KeyValue(key="destination.port", value=port),
    ]
    seen: set[str] = set()
    out = []
    for name in order:
        first = name not in seen and order.count(name) > 1
        seen.add(name)
        decoy = DECOY.get(name, 0) if first else 0
        if name == "start":
            out.append(b"\x11" + struct.pack("<Q", start + decoy))
        elif name == "time":
            out.append(b"\x19" + struct.pack("<Q", t + decoy))
        elif name == "value":
            out.append(b"\x31" + struct.pack("<q", value + decoy))
        elif name == "exemplar":  # of this interval: its bytes change every time
            out.append(ld(0x2A, Exemplar(time_unix_nano=t, as_int=value).SerializeToString()))
        elif name == "flags":
            out.append(b"\x40" + varint(flags or 0))
        else:
            out.append(ld(0x3A, attrs[int(name[-1])].SerializeToString()))
    return b"".join(out)


def request(
    styles: Mapping[tuple[int, str], Style],
    values: list[int],
    t: int,
    *,
    flows: tuple[tuple[str, str], ...] = FLOWS,
    node: str = "n-a1",
    start: int = START,
) -> bytes:
    """One agent's request, bytes and packets of every flow, encoded by hand around the points."""
    resource = Resource(
        attributes=[KeyValue(key=schema.RESOURCE_NODE_NAME, value=AnyValue(string_value=node))]
    )
    trailer = Sum(aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE, is_monotonic=True)
    metrics = []
    for name, scale in METRICS:
        points = b"".join(
            ld(0x0A, point(styles[(flow, name)], *flows[flow], t, value * scale, start=start))
            for flow, value in enumerate(values)
        )
        header = Metric(name=name).SerializeToString()
        metrics.append(ld(0x12, header + ld(0x3A, points + trailer.SerializeToString())))
    body = ld(0x0A, resource.SerializeToString()) + ld(0x12, b"".join(metrics))
    return ld(0x0A, body)


class Pair:
    """A core given the hand-encoded requests and its twin given the same requests as protobuf re-encodes
    them (field-number order), both as the receivers hand them (encoded: steady requests from their bytes)."""

    def __init__(self) -> None:
        self.beds = []
        for _ in range(2):
            stream = io.StringIO()
            core, agg, registry, sink = make_core(FakeIndex(), flow_log=FlowLogWriter(stream))
            self.beds.append((core, agg, registry, sink, stream))

    def send(self, payload: bytes, truth: list[int]) -> None:
        canonical = ExportMetricsServiceRequest.FromString(payload).SerializeToString()
        seen = []
        for (core, agg, registry, sink, stream), raw in zip(self.beds, (payload, canonical), strict=True):
            outcome = core.consume_encoded(raw, ExportMetricsServiceRequest.FromString)
            with agg.lock:
                agg.before_snapshot and agg.before_snapshot()
                totals = {name: dict(family) for name, family in agg.families().items()}
            for name, scale in ((schema.FLOW_BYTES, 1500), (schema.FLOW_PACKETS, 1)):
                counted = sorted(totals[name.replace("kzt.", "").replace(".", "_")].values())
                assert counted == sorted(float(v * scale) for v in truth), (name, counted)  # each once
            assert core.active_series == 2 * len(truth)
            health = sorted(
                (s.name, tuple(sorted(s.labels.items())), s.value)
                for family in registry.collect()
                if family.name.startswith("kzt_enricher") and family.name not in HOW_READ
                for s in family.samples
                if not s.name.endswith("_created")
            )
            # re-exported points compared as messages: the steady path appends the added attributes
            # after the received bytes (concatenation merges), the object path re-encodes in field order
            forwarded = ExportMetricsServiceRequest.FromString(sink.metrics[-1])
            seen.append(
                (
                    outcome,
                    totals,
                    health,
                    forwarded,
                    log_records(sink.logs),
                    sorted(stream.getvalue().splitlines()),
                )
            )
        assert seen[0] == seen[1]


def log_records(requests: list[bytes]) -> list[bytes]:
    """The flow-log records sent, in any order: an odd point's record is made as it is read, before those
    of the Sum's other points."""
    return sorted(
        record.SerializeToString()
        for raw in requests
        for rl in ExportLogsServiceRequest.FromString(raw).resource_logs
        for sl in rl.scope_logs
        for record in sl.log_records
    )


def run(styles: Mapping[tuple[int, str], Style], steps: list[list[int]]) -> None:
    pair, t = Pair(), 2_000_000_000
    for values in steps:
        t += 1_000_000_000
        pair.send(request(styles, values, t), values)


def test_exemplars_after_the_attributes_are_one_series() -> None:
    """The JS serializer's order (start, time, value, attributes) with this interval's exemplar after."""
    js = ((*CANONICAL, "exemplar"), None, False)
    run(
        {(f, m): js for f in range(len(FLOWS)) for m, _ in METRICS},
        [[10, 20, 30, 40], [15, 20, 35, 41], [16, 25, 35, 50]],
    )


def test_a_time_or_value_written_twice_is_read_as_protobuf_reads_it() -> None:
    """A later copy of a field wins: the first copy (after the prefix here) must not be counted."""
    for again in ("start", "time", "value"):
        order = ("start", "time", "value", "attr0", "attr1", "attr2", again)
        styles = {
            (f, m): ((order[-1], *order[:-1]), None, False) for f in range(len(FLOWS)) for m, _ in METRICS
        }
        styles[(0, schema.FLOW_BYTES)] = (order, None, False)  # the copy after the attributes
        run(styles, [[10, 20, 30, 40], [15, 20, 35, 41]])


FIELDS = st.sampled_from(
    [
        CANONICAL,
        (*CANONICAL, "exemplar"),
        (*CANONICAL, "flags"),
        (*CANONICAL, "exemplar", "flags"),
        (*CANONICAL, "time"),
        (*CANONICAL, "value"),
        ("start", "start", *CANONICAL[1:]),
    ]
)


@st.composite
def styles(draw: st.DrawFn) -> dict[tuple[int, str], Style]:
    out = {}
    for flow in range(len(FLOWS)):
        int_port = draw(st.booleans())  # not only string attributes: the key is decoded to be checked
        for name, _ in METRICS:
            fields = draw(FIELDS)
            if draw(st.booleans()):  # the prefix first, the rest in any order
                order = (*fields[:3], *draw(st.permutations(fields[3:])))
            else:  # any order at all
                order = tuple(draw(st.permutations(fields)))
            flags = draw(st.sampled_from([None, 0, 1])) if "flags" in fields else None
            out[(flow, name)] = (order, flags, int_port)
    return out


@PROPERTIES
@given(
    styles(),
    st.lists(st.lists(st.integers(0, 5), min_size=len(FLOWS), max_size=len(FLOWS)), min_size=2, max_size=5),
)
def test_any_field_order_counts_each_value_once(
    drawn: dict[tuple[int, str], Style], growth: list[list[int]]
) -> None:
    values, steps = [1] * len(FLOWS), []
    for grow in growth:
        values = [v + g for v, g in zip(values, grow, strict=True)]
        steps.append(values)
    run(drawn, steps)
