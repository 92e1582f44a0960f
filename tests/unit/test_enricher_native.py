"""The C extension (processing/_native*.c) is a fast path of the counting rule, the layout reader and the
OTLP flow-log encoding, not a second statement of any: hypothesis drives the real core with the extension
and without it (repeats.py reading, the Python loop calling state/counting.py for every point, flowlogs.py
writing the records) through the same deliveries (growing values, also measured before the last; idle,
stale, negative and late points, restarts, a Sum's fields after its points changed, duplicate requests,
reordering, renames, gaps past the sweep and the TTL) and requires everything they produce to be
identical: aggregates, not_counted and the other health counters, re-exported bytes, OTLP and JSON flow
logs.

In CI (CI=true) the extension must be built: a missing one fails here, it is not skipped."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_DELTA

from otel_kzt.enricher.processing import flowlogs, native
from otel_kzt.enricher.processing.flowlogs import FlowRecords
from otel_kzt.enricher.processing.repeats import layout
from tests.unit import test_enricher_repeats
from tests.unit.test_enricher_core import PODS
from tests.unit.test_enricher_repeats import FLOWS, TTL_S, encode
from tests.unit.test_enricher_wire import template as wire_template

needs_native = pytest.mark.skipif(
    not native.BUILT and os.environ.get("CI") != "true", reason=f"C extension not built: {native.PATH}"
)
CHANGES = ("grow",) * 8 + ("idle", "idle", "stale", "late", "restart", "huge", "negative", "missing")
STEPS = ("send",) * 8 + ("rewind", "delta", "again", "shuffle", "rename", "sweep", "forget")
PROPERTIES = settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_the_extension_is_built_in_ci() -> None:
    """CI installs the package as a user would (scripts/setup.sh): the extension must have been built (and
    is in use unless OTEL_KZT_NO_NATIVE says otherwise)."""
    if os.environ.get("CI") != "true" and not native.BUILT:
        pytest.skip(f"not CI and not built: {native.PATH}")
    assert native.BUILT, native.PATH
    disabled = os.environ.get(native.DISABLE_ENV, "") not in ("", "0")
    assert native.PATH.startswith("Python" if disabled else "C extension"), native.PATH


def test_the_python_path_is_selectable() -> None:
    """OTEL_KZT_NO_NATIVE=1 runs the Python loop (and says so), whether the extension is built or not."""
    code = "from otel_kzt.enricher.processing import native; print(native.MODULE is None, native.PATH)"
    env = {**os.environ, native.DISABLE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    why = "disabled by OTEL_KZT_NO_NATIVE" if native.BUILT else "not built"
    assert out.stdout.startswith(f"True Python (the C extension is {why}"), out.stdout


def test_an_extension_built_from_older_sources_counts_as_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """One lacking a function its users take (a worktree not rebuilt) is not used: the Python path runs."""
    from otel_kzt.enricher import processing

    stale = types.ModuleType("otel_kzt.enricher.processing._native")
    stale.__file__ = "/stale/_native.so"
    for name in native.FUNCTIONS[:-1]:
        setattr(stale, name, len)
    monkeypatch.setattr(processing, "_native", stale, raising=False)
    monkeypatch.setitem(sys.modules, "otel_kzt.enricher.processing._native", stale)
    assert native._load() == (
        None,
        f"/stale/_native.so is built from older sources (no {native.FUNCTIONS[-1]}): rebuild it",
    )
    setattr(stale, native.FUNCTIONS[-1], len)
    assert native._load() == (stale, "")


class Twins(test_enricher_repeats.Twins):
    """Two cores over one index and clock, both keeping layouts, the first counting them in C, the other
    in Python (whatever OTEL_KZT_NO_NATIVE says): everything they produce, side by side."""

    def __init__(self) -> None:
        super().__init__()
        in_c, python = self.beds[0][0]._points, self.beds[1][0]._points
        assert native.EXTENSION is not None, native.PATH  # in CI: a failure, not a skip
        in_c._loop, python._layouts, python._loop = native.EXTENSION.repeat, {}, None
        in_c._otlp_logs, python._otlp_logs = native.EXTENSION.otlp_logs, None
        in_c._json_lines, python._json_lines = native.EXTENSION.json_lines, None
        in_c._read_layout, python._read_layout = native.EXTENSION.read_layout, None


@st.composite
def scenarios(draw: st.DrawFn) -> list[tuple[str, list[tuple[int, str]]]]:
    flows = draw(st.integers(1, len(FLOWS)))
    steps = []
    for _ in range(draw(st.integers(1, 24))):
        step = draw(st.sampled_from(STEPS))
        sends = step in ("send", "rewind", "delta")
        changes = [(f, draw(st.sampled_from(CHANGES))) for f in range(flows)] if sends else []
        steps.append((step, changes))
    return steps


@needs_native
@PROPERTIES
@given(scenarios())
def test_the_extension_counts_and_forwards_what_the_python_rule_does(
    steps: list[tuple[str, list[tuple[int, str]]]],
) -> None:
    twins = Twins()
    starts, values = [1_000] * len(FLOWS), [0] * len(FLOWS)
    previous: list[tuple[int, int]] = [(1_000, 0)] * len(FLOWS)  # each flow's last run before its restart
    order, t, last = list(range(len(FLOWS))), 100_000_000_000, b""  # room for rewinds
    for step, changes in steps:
        twins.now[0] += 1.0
        t += 1_000_000_000 if step != "rewind" else -2_500_000_000  # a sender's clock stepped back
        if step == "again" and last:
            twins.send(last)
        elif step == "shuffle":
            order.reverse()
        elif step == "rename":
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
                previous[flow] = (starts[flow], values[flow])
                starts[flow], values[flow] = starts[flow] + 1, 1
            elif change == "huge" and values[flow] < 5 * 10**15:  # near int64's end once scaled to bytes
                values[flow] += 10**15
            elif change == "missing":
                continue
            if change == "late":  # the previous run's final value again, and a little more
                start, value = previous[flow][0], previous[flow][1] + 1
                previous[flow] = (start, value)
            else:
                start, value = (
                    starts[flow],
                    -1 if change == "negative" else values[flow] - (change == "stale"),
                )
            sent.append((flow, start, value))
        if sent:
            last = encode(sent, t) if step != "delta" else delta(encode(sent, t))
            twins.send(last)


def delta(payload: bytes) -> bytes:
    """The request with its Sums' fields after the points changed (delta temporality: refused whole)."""
    req = ExportMetricsServiceRequest.FromString(payload)
    for m in req.resource_metrics[0].scope_metrics[0].metrics:
        m.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_DELTA
    return req.SerializeToString()


@needs_native
def test_the_json_lines_writer_writes_what_the_python_code_does_and_declines_the_rest() -> None:
    """The same lines for the values a record holds (float and int counts, records of several resources
    and keys); a count out of its range, or floats that are not 3 a record, are left to the Python code
    (which writes them or raises, as it always did); orjson's null for a float is copied as it is."""
    assert native.EXTENSION is not None
    in_c, python = native.EXTENSION.json_lines, None
    cases: list[list[tuple[bytes, bytes, float, float, int, int]]] = [
        [(b"n1", b"a", 1500.0, 1.0, 1_000_000_000, 3_500_000_000)],
        [(b"n1", b"a", 3.9, 2, 1, 2), (b"n2", b"a", 10**12 + 0.5, 7.0, 1_500_000_001, 2**62)],
        [(b"n1", b"a", 1e-300, 0.0, 0, 1), (b"n1", b"b", 5.0, 2**40, 2, 3)],  # two keys, one block
        [(b"n1", b"a", 1e300, 1.0, 1, 2)],  # declined by the C writer: int() of it is beyond 64 bits
        # one interval for all (an agent's request): its start and end written once, copied in each line
        [(b"n1", k, 1500.0 * i, i, 1_000_000_000, 2_000_000_001) for i, k in enumerate((b"a", b"b", b"c"))],
        [(b"n1", b"a", 3.0, 1, 5, 9), (b"n1", b"b", 2**63, 1, 5, 9)],  # ... a count it declines
    ]
    for records in cases:
        made = []
        for writer in (in_c, python):
            flows = FlowRecords(None, writer)
            for resource, key, byte_count, packets, start, end in records:
                tpl = wire_template()
                flows.add(resource, [(tpl, key, byte_count, start, end)], is_bytes=True)
                flows.add(resource, [(tpl, key, packets, start, end)], is_bytes=False)
            made.append(flows.json_lines())
        assert made[0] == made[1] and made[0].count(b"\n") == len(records)
    glue, tpl = flowlogs._JSON_GLUE, wire_template()
    floats = b"[1.0,2.0,null]"
    assert in_c(glue, [tpl], floats, [1e300], [1.0]) is None
    assert in_c(glue, [tpl], b"[1.0,2.0]", [1.0], [1.0]) is None  # not 3 floats a record
    # shared: one start and one end token for every record, then a cost each (n + 2 tokens)
    each = in_c(glue, [tpl, tpl], b"[1.5,1.5,2.5,2.5,0.25,0.5]", [3, 4], [5, 6])
    assert each is not None and in_c(glue, [tpl, tpl], b"[1.5,2.5,0.25,0.5]", [3, 4], [5, 6], True) == each
    assert in_c(glue, [tpl, tpl], b"[1.5,2.5,0.25]", [3, 4], [5, 6], True) is None
    assert in_c(glue, [tpl, tpl], b"[1.5,1.5,2.5,2.5,0.25,0.5]", [3, 4], [5, 6], True) is None
    assert in_c(glue, [tpl], floats, [-2.5], [7]).endswith(
        b':-2,"kzt.flow.packets":7,"kzt.estimated_cost_usd":null}\n'
    )


@needs_native
def test_the_layout_reader_gives_each_point_its_own_start_time_and_value() -> None:
    """A Sum read in C as Layout.read reads it in Python: runs of points sharing a start or a time (the C
    reader hands them one int each) and points that do not, each value its own."""
    assert native.EXTENSION is not None
    points = [(5, 9, 1), (5, 9, 2), (7, 9, 3), (7, 11, 4), (5, 11, 5), (2**64 - 1, 11, 6), (5, 12, 7)]
    keys = [b"\x3a\x02k%d" % i for i in range(len(points))]
    body, seen = b"", []
    for (start, t, value), key in zip(points, keys, strict=True):
        point = struct.pack("<BQBQBq", 0x11, start, 0x19, t, 0x31, value) + key
        seen.append((len(body), len(body) + 2, types.SimpleNamespace(
            header=b"", resolved=types.SimpleNamespace(extra=b""), size=0, valid_from=0, valid_until=2**64,
        ), key))  # fmt: skip
        body += bytes((0x0A, len(point))) + point
    buf, trailer = body + b"\x10\x02", b"\x10\x02"
    made = {}
    for name, reader in (("c", native.EXTENSION.read_layout), ("python", None)):
        shape = layout(1, (buf, 0, len(buf)), seen, trailer, reader)  # type: ignore[arg-type]
        assert shape is not None
        made[name] = shape.read(buf, 0, len(buf))
    assert made["c"] == made["python"]
    assert made["c"] is not None and made["c"][1][1::6] == [p[0] for p in points]
    assert made["c"][1][3::6] == [p[1] for p in points] and made["c"][1][5::6] == [p[2] for p in points]
