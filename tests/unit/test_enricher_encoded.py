"""A steady request read from its bytes alone (processing/encoded.py): not decoded, the same outcome as
the object path (test_enricher_repeats.py compares everything), and bad bytes in a steady shape refused
whole as a decode refuses them, nothing counted."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client import CollectorRegistry

from otel_kzt import schema
from otel_kzt.enricher.state.agents import AgentsHealth
from tests.unit.test_enricher_agents import NODE, agent_pass, scrape
from tests.unit.test_enricher_core import FakeIndex, make_core
from tests.unit.test_enricher_repeats import FLOWS, Twins, encode


class Decodes:
    """The decode a receiver hands the core, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, raw: bytes) -> ExportMetricsServiceRequest:
        self.calls += 1
        return ExportMetricsServiceRequest.FromString(raw)


def steady(i: int) -> bytes:
    return encode([(f, 1_000, 10 * (i + 1)) for f in range(len(FLOWS))], 2_000_000_000 + i)


def test_a_steady_request_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request is decoded (every series new, its layout learnt in that pass); from the second
    on, none is, and the outcome equals the decoded object path's (Twins compares them)."""
    twins, decodes = Twins(), Decodes()
    core, registry = twins.beds[0][0], twins.beds[0][2]
    consume = core.consume_encoded
    monkeypatch.setattr(core, "consume_encoded", lambda raw, _decode: consume(raw, decodes))
    counts, reads = [], []
    for i in range(5):
        twins.now[0] += 1.0
        twins.send(steady(i))
        counts.append(decodes.calls)
        reads.append(how_read(registry))
    assert counts == [1, 1, 1, 1, 1]
    # what the enricher tells about it (/metrics): requests read from bytes or decoded, Sums by layout or
    # point by point; the core without layouts, given decoded requests, reads everything the slow way
    assert reads == [(i, 1, 2 * i, 2) for i in range(5)]
    assert how_read(twins.beds[1][2]) == (0, 5, 0, 10)


def how_read(registry: CollectorRegistry) -> tuple[float, ...]:
    """(requests from bytes, decoded; flow Sums by layout, point by point) as counted on /metrics."""
    pairs = [
        (schema.ENRICHER_METRIC_REQUESTS, schema.READ_BYTES),
        (schema.ENRICHER_METRIC_REQUESTS, schema.READ_DECODED),
        (schema.ENRICHER_FLOW_SUMS, schema.READ_LAYOUT),
        (schema.ENRICHER_FLOW_SUMS, schema.READ_POINTS),
    ]
    return tuple(
        registry.get_sample_value(name + "_total", {schema.ENRICHER_READ_LABEL: read}) or 0.0
        for name, read in pairs
    )


def schema_url(payload: bytes, url: bytes) -> bytes:
    """The request with ScopeMetrics.schema_url (field 3) appended to its one scope, as raw bytes."""
    req = ExportMetricsServiceRequest.FromString(payload)
    req.resource_metrics[0].scope_metrics[0].schema_url = "X" * len(url)
    return req.SerializeToString().replace(b"X" * len(url), url)


@pytest.mark.parametrize(
    "garble",
    [
        lambda p: p[:-1],  # truncated: the last field ends beyond the request
        lambda p: p + b"\x0a",  # a field without its length
        lambda p: schema_url(p, b"\xff\xfe"),  # a string that is not UTF-8
        lambda p: p.replace(b"10.0.0.1", b"10.0.0\xff"),  # an attribute value that is not UTF-8
        lambda p: b"\x0a" + b"\xff" * 200_000,  # a length that never ends (read as at most 10 bytes)
    ],
    ids=["truncated", "dangling-tag", "bad-utf8-scope", "bad-utf8-point", "endless-length"],
)
def test_bad_bytes_in_a_steady_shape_are_refused_whole(garble: Callable[[bytes], bytes]) -> None:
    core, agg, _, sink = make_core(FakeIndex(), clock=lambda: 100.0)
    for i in range(3):
        core.consume_encoded(steady(i), ExportMetricsServiceRequest.FromString)
    with agg.lock:
        agg.before_snapshot and agg.before_snapshot()
        before = {name: dict(family) for name, family in agg.families().items()}
    forwarded = len(sink.metrics)
    with pytest.raises(DecodeError):
        core.consume_encoded(garble(steady(3)), ExportMetricsServiceRequest.FromString)
    with agg.lock:
        agg.before_snapshot and agg.before_snapshot()
        assert {name: dict(family) for name, family in agg.families().items()} == before
    assert len(sink.metrics) == forwarded
    core.consume_encoded(steady(3), ExportMetricsServiceRequest.FromString)  # the good one still counts
    with agg.lock:
        agg.before_snapshot and agg.before_snapshot()
        assert {name: dict(family) for name, family in agg.families().items()} != before


def test_an_agents_health_next_to_steady_flows_is_kept_without_decoding_the_request() -> None:
    """A real agent pass's kzt.agent.* telemetry next to steady flows: the flows read from their layouts,
    the telemetry decoded alone, kept as the decoded path keeps it and passed through."""
    _, telemetry = agent_pass()
    health = ExportMetricsServiceRequest.FromString(telemetry).resource_metrics[0].scope_metrics[0].metrics
    agents = AgentsHealth(FakeIndex(), clock=lambda: 100.0)
    core, _, registry, sink = make_core(FakeIndex(), agents=agents, clock=lambda: 100.0)
    registry.register(agents)
    decodes = Decodes()
    for i in range(3):
        req = ExportMetricsServiceRequest.FromString(steady(i))
        req.resource_metrics[0].scope_metrics[0].metrics.extend(health)
        core.consume_encoded(req.SerializeToString(), decodes)
    assert decodes.calls == 1  # the first request's: every series new
    forwarded = ExportMetricsServiceRequest.FromString(sink.metrics[-1]).resource_metrics[0].scope_metrics[0]
    assert list(forwarded.metrics)[-len(health) :] == list(health)
    got = scrape(registry)
    assert got[(schema.AGENT_OVERFLOW_BYTES + "_total", (("k8s_node_name", NODE),))] == 5_000
    assert got[(schema.AGENT_FLOWS_TRACKED, (("k8s_node_name", NODE),))] == 3
