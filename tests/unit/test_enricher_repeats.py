"""A Sum in its group's last shape (processing/repeats.py) is enriched and counted exactly as the general pass
would: hypothesis drives one core with layouts and one without through the same requests (growing, idle,
stale and negative values, restarts, missing or reordered points, duplicates of whole requests, renames,
gaps past the sweep and the TTL) and compares everything they produce."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE

from otel_kzt import schema
from otel_kzt.enricher.processing import repeats
from otel_kzt.enricher.processing.flowlogs import FlowLogWriter
from tests.unit.test_enricher_core import PODS, FakeIndex, make_core

# cross-zone, same-zone, cross-region, external
FLOWS = (
    ("10.0.0.1", "10.0.0.4"),
    ("10.0.0.1", "10.0.0.3"),
    ("10.0.0.2", "10.0.0.5"),
    ("10.0.0.1", "8.8.8.8"),
)
TTL_S = 60.0
CHANGES = ("grow",) * 8 + ("idle", "idle", "stale", "restart", "negative", "missing")
STEPS = ("send",) * 8 + ("again", "shuffle", "rename", "sweep", "forget")
# How each core read what it got: these differ by design (one keeps no layouts, one is handed encoded bytes)
HOW_READ = (schema.ENRICHER_METRIC_REQUESTS, schema.ENRICHER_FLOW_SUMS)
PROPERTIES = settings(
    max_examples=120, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class NoLayouts(dict):  # type: ignore[type-arg]
    """The layouts of a core that keeps none: every Sum takes the general pass."""

    def __setitem__(self, key: object, value: object) -> None:
        """Keep nothing."""


def encode(points: list[tuple[int, int, int]], t: int) -> bytes:
    """One agent's request: bytes and packets of each (flow, start, value), in the order given."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key=schema.RESOURCE_NODE_NAME).value.string_value = "n-a1"
    sm = rm.scope_metrics.add()
    for metric, scale in ((schema.FLOW_BYTES, 1500), (schema.FLOW_PACKETS, 1)):
        m = sm.metrics.add(name=metric)
        m.sum.is_monotonic = True
        m.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
        for flow, start, value in points:
            dp = m.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=t, as_int=value * scale)
            src, dst = FLOWS[flow]
            for key, text in ((schema.SOURCE_ADDRESS, src), (schema.DESTINATION_ADDRESS, dst)):
                dp.attributes.add(key=key).value.string_value = text
    return req.SerializeToString()


class Twins:
    """Two cores over one index and clock, one keeping layouts and given encoded requests: everything they
    produce, side by side."""

    def __init__(self) -> None:
        self.index, self.now = FakeIndex(), [100.0]
        self.beds = []
        for keep in (True, False):
            stream = io.StringIO()
            core, agg, registry, sink = make_core(
                self.index, clock=lambda: self.now[0], series_ttl_s=TTL_S, flow_log=FlowLogWriter(stream)
            )
            if not keep:
                core._points._layouts = NoLayouts()
            self.beds.append((core, agg, registry, sink, stream))

    def send(self, payload: bytes) -> None:
        seen = []
        for core, agg, registry, sink, stream in self.beds:
            if core._points._layouts.__class__ is NoLayouts:  # decoded, every Sum the general pass
                outcome = core.consume_metrics(ExportMetricsServiceRequest.FromString(payload), raw=payload)
            else:  # as the receivers hand it: steady requests read from their bytes alone (encoded.py)
                outcome = core.consume_encoded(payload, ExportMetricsServiceRequest.FromString)
            with agg.lock:
                agg.before_snapshot and agg.before_snapshot()
                totals = {name: dict(family) for name, family in agg.families().items()}
            health = sorted(
                (s.name, tuple(sorted(s.labels.items())), s.value)
                for family in registry.collect()
                if family.name.startswith("kzt_enricher") and family.name not in HOW_READ
                for s in family.samples
                if not s.name.endswith("_created")  # when each counter was made
            )
            seen.append((outcome, totals, health, sink.metrics[-1:], sink.logs[-1:], stream.getvalue()))
        assert seen[0] == seen[1]


@st.composite
def scenarios(draw: st.DrawFn) -> list[tuple[str, list[tuple[int, str]]]]:
    flows = draw(st.integers(1, len(FLOWS)))
    steps = []
    for _ in range(draw(st.integers(1, 24))):
        step = draw(st.sampled_from(STEPS))
        changes = [(f, draw(st.sampled_from(CHANGES))) for f in range(flows)] if step == "send" else []
        steps.append((step, changes))
    return steps


@PROPERTIES
@given(scenarios())
def test_a_repeated_shape_counts_and_forwards_what_the_general_pass_would(
    steps: list[tuple[str, list[tuple[int, str]]]],
) -> None:
    twins = Twins()
    starts, values = [1_000] * len(FLOWS), [0] * len(FLOWS)
    order, t, last = list(range(len(FLOWS))), 2_000_000_000, b""
    for step, changes in steps:
        twins.now[0] += 1.0
        t += 1_000_000_000
        if step == "again" and last:
            twins.send(last)
        elif step == "shuffle":
            order.reverse()
        elif step == "rename":  # the destination pod of the first flow moves to another zone
            other = PODS["10.0.0.3"] if twins.index.pods["10.0.0.4"] == PODS["10.0.0.4"] else PODS["10.0.0.4"]
            twins.index.pods["10.0.0.4"] = other
            twins.index.gen += 1
        elif step in ("sweep", "forget"):
            twins.now[0] += TTL_S / 4 + 1 if step == "sweep" else TTL_S + 1
        sent = []
        for flow, change in sorted(changes, key=lambda c: order.index(c[0])):
            if change == "grow":
                values[flow] += 3
            elif change == "restart":
                starts[flow], values[flow] = starts[flow] + 1, 1
            elif change == "missing":
                continue
            value = {"stale": values[flow] - 1, "negative": -1}.get(change, values[flow])
            sent.append((flow, starts[flow], value))
        if sent:
            last = encode(sent, t)
            twins.send(last)


def test_a_steady_agent_is_counted_from_its_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same series every interval: from the second request on, each Sum is read from its layout (the
    first request's pass made it: its new series were named and counted plainly)."""
    hits = []
    read = repeats.Layout.read

    def spy(self: repeats.Layout, *part: object) -> object:
        found = read(self, *part)  # type: ignore[arg-type]
        hits.append(found is not None)
        return found

    monkeypatch.setattr(repeats.Layout, "read", spy)
    twins = Twins()
    for i in range(5):
        twins.now[0] += 1.0
        twins.send(encode([(f, 1_000, 10 * (i + 1)) for f in range(len(FLOWS))], 2_000_000_000 + i))
    assert hits == [True] * 8  # two Sums (bytes, packets) a request, from the second request on
