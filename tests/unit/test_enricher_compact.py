"""What the core keeps per new flow is shared where one object serves many (issue 11: 100k new flows in a
cluster's first interval): a flow's bytes and packets series are tracked by one key object, the series of
one Sum share its start and time ints, and layouts share their received point headers and make the Python
reader only when it reads."""

from __future__ import annotations

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from otel_kzt import schema
from otel_kzt.enricher.processing.repeats import Layout
from tests.unit.test_enricher_core import FakeIndex, make_core
from tests.unit.test_enricher_repeats import FLOWS, encode

T0 = 2_000_000_000_000  # ns, well above the small-int cache: each int a separate object unless shared


def _sent(requests: int = 1) -> tuple[dict[tuple[bytes, str], dict[bytes, object]], dict[object, Layout]]:
    core = make_core(FakeIndex(), clock=lambda: 100.0)[0]
    for i in range(requests):
        core.consume_encoded(
            encode([(f, T0, 10 * (i + 1)) for f in range(len(FLOWS))], T0 + i),
            ExportMetricsServiceRequest.FromString,
        )
    return core._table.groups, core._points._layouts


def _by_metric(groups: dict[tuple[bytes, str], dict[bytes, object]]) -> dict[str, dict[bytes, object]]:
    assert len({resource for resource, _ in groups}) == 1
    return {metric: table for (_, metric), table in groups.items()}


def test_a_flows_two_series_are_tracked_by_one_key_object() -> None:
    groups, layouts = _sent()
    tables = _by_metric(groups)
    byte_keys, packet_keys = list(tables[schema.FLOW_BYTES]), list(tables[schema.FLOW_PACKETS])
    assert byte_keys == packet_keys and len(byte_keys) == len(FLOWS)
    assert all(b is p for b, p in zip(byte_keys, packet_keys, strict=True))
    # the layouts made from that pass hold the same objects
    assert len(layouts) == 2
    for known in layouts.values():
        assert all(k is t for k, t in zip(known.keys, byte_keys, strict=True))


def test_the_series_of_one_sum_share_its_start_and_time() -> None:
    for table in _by_metric(_sent()[0]).values():
        series = list(table.values())
        assert [s.start for s in series] == [T0] * len(FLOWS)  # type: ignore[attr-defined]
        assert [s.last_time for s in series] == [T0] * len(FLOWS)  # type: ignore[attr-defined]
        assert len({id(s.start) for s in series}) == 1  # type: ignore[attr-defined]
        assert len({id(s.last_time) for s in series}) == 1  # type: ignore[attr-defined]


def test_layouts_share_their_received_headers_and_make_the_python_reader_when_it_reads() -> None:
    layouts = list(_sent(requests=2)[1].values())
    first, second = (known.received for known in layouts)
    assert first == second  # the same point lengths in both Sums (bytes, packets)
    assert all(a is b for a, b in zip(first, second, strict=True))
    known = layouts[0]
    if known.c_read is not None:  # read in C: no Python reader was made
        assert known._reader is None and known._heads == ()
    assert known.heads == tuple(zip(*known.received, strict=True))
    points = sum(len(h) + 27 + len(k) for h, k in zip(known.received, known.keys, strict=True))
    assert known.reader.size == points + len(known.trailer)
