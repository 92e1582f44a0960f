"""Flow-log pairing: records paired by position (a resource's bytes and packets Sums of the same series in
the same order, the agents' case) are exactly the records pairing by key makes, in the same order, with
the same numbers; so are those of any other mix (a key twice, other orders, a third Sum, one metric only)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from otel_kzt import schema
from otel_kzt.enricher.processing.flowlogs import Billed, FlowRecords, FlowTemplate
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.schema import TrafficClass

TEMPLATES = [
    FlowTemplate(
        Resolved(b"", {schema.SOURCE_ADDRESS: f"10.0.0.{i}", schema.DESTINATION_ADDRESS: "10.0.1.1"},
                 TrafficClass.CROSS_ZONE, "aws"),
        (i + 1) * 1e-11,
        json_lines=True,
        otlp=True,
    )
    for i in range(3)
]  # fmt: skip
KEYS = [f"key-{i}".encode() for i in range(6)]


def by_key(adds: list[tuple[bytes, list[Billed], bool, bool]]) -> list[list[Any]]:
    """The records as pairing by key makes them, row by row: [template, start, end, bytes, packets, cost]."""
    rows: list[list[Any]] = []
    seen: dict[tuple[bytes, bytes], list[Any]] = {}
    for resource, billed, is_bytes, _ in adds:
        for template, key, inc, since, t in billed:
            row = seen.get((resource, key))
            if row is None:
                row = seen[resource, key] = [template, since, t, 0.0, 0.0, 0.0]
                rows.append(row)
            row[3 if is_bytes else 4] += inc
            if is_bytes:
                row[5] += inc * template.usd_per_byte
    return rows


increments = st.one_of(st.integers(1, 2**62), st.floats(1e-3, 1e15, allow_nan=False))
billed_of = st.builds(
    lambda t, inc, since, dt: (TEMPLATES[t], inc, since, since + dt),
    st.integers(0, 2), increments, st.integers(0, 10**18), st.integers(1, 10**10),
)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[bytes, list[Billed], bool, bool]]:
    """Adds as the core makes them: mostly each resource's bytes then packets of the same series in the
    same order, and every other mix."""
    adds = []
    for _ in range(draw(st.integers(1, 8))):
        resource = draw(st.sampled_from([b"node-a", b"node-b", b"node-c"]))
        earlier = [keys for r, keys, _ in adds if r == resource]
        if earlier and draw(st.booleans()):
            keys = earlier[-1]  # the same series again, in the same order (the other Sum, as agents send)
        else:
            keys = draw(st.lists(st.sampled_from(KEYS), max_size=6))
        adds.append((resource, keys, draw(st.booleans())))
    out = []
    for resource, keys, is_bytes in adds:
        drawn = draw(st.lists(billed_of, min_size=len(keys), max_size=len(keys)))
        billed = [(tpl, key, inc, since, t) for key, (tpl, inc, since, t) in zip(keys, drawn, strict=True)]
        distinct = len(set(keys)) == len(keys) and draw(st.booleans())  # a caller may not know
        out.append((resource, billed, is_bytes, distinct))
    return out


@settings(max_examples=400, deadline=None)
@given(requests())
def test_pairing_by_position_is_pairing_by_key(adds: list[tuple[bytes, list[Billed], bool, bool]]) -> None:
    records = FlowRecords()
    for resource, billed, is_bytes, distinct in adds:
        records.add(resource, billed, is_bytes=is_bytes, distinct=distinct)
    rows = by_key(adds)
    assert len(records) == len(rows)
    columns = [list(c) for c in records._columns()]
    expected = [list(c) for c in zip(*rows, strict=True)] if rows else [[]] * 6
    assert columns == expected  # the same records in the same order: templates, times and numbers
    assert [list(map(type, c)) for c in columns] == [list(map(type, c)) for c in expected]
    reference = FlowRecords()  # the same rows, one add per record, by key
    for resource, billed, is_bytes, _ in adds:
        for one in billed:
            reference.add(resource, [one], is_bytes=is_bytes)
    assert records.json_lines() == reference.json_lines()
    if rows:
        assert records.otlp_request() == reference.otlp_request()


def test_the_agents_case_is_paired_by_position() -> None:
    """Bytes then packets of the same distinct series: one block, no per-key index."""
    records = FlowRecords()
    bytes_ = [(TEMPLATES[0], key, 1500 * (i + 1), 1, 2) for i, key in enumerate(KEYS)]
    packets = [(TEMPLATES[0], key, i + 1, 1, 2) for i, key in enumerate(KEYS)]
    records.add(b"node-a", bytes_, is_bytes=True, distinct=True)
    records.add(b"node-a", packets, is_bytes=False, distinct=True)
    assert not records._by_key and len(records._blocks) == 1
    _, _, _, byte_counts, packet_counts, costs = records._columns()
    assert byte_counts == [1500.0 * (i + 1) for i in range(6)]
    assert packet_counts == [i + 1.0 for i in range(6)]
    assert costs == [1500 * (i + 1) * 1e-11 for i in range(6)]
