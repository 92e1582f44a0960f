"""A new flow's attributes read and joined in C (processing/_native_named.c) give what pieces.py's Python
statements give (`received_given_py`, `joined_py`): hypothesis drives both on generated series keys
(string attributes as agents write them, also long, empty, non-ASCII, repeated keys, another kind of value,
flags, cut or altered bytes) and on generated ends' pieces, with the caches cold or warm, and requires
identical output; the Python side is itself checked against protobuf's decoding of the same bytes.

In CI (CI=true) the extension must be built: a missing one fails here, it is not skipped."""

from __future__ import annotations

import json
import os
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

from otel_kzt import schema
from otel_kzt.enricher.processing import flowlogs, native, pieces
from otel_kzt.enricher.state.series import identity_key

needs_native = pytest.mark.skipif(
    not native.BUILT and os.environ.get("CI") != "true", reason=f"C extension not built: {native.PATH}"
)
PROPERTIES = settings(max_examples=400, derandomize=True, deadline=None)
# short names and values that repeat (cache hits), odd ones (escapes, non-ASCII, long: over 127 bytes)
_WORDS = st.sampled_from(["source.address", "destination.address", "network.transport", "k8s.pod.name", "a"])
_TEXT = st.one_of(_WORDS, st.text(max_size=6), st.text(min_size=100, max_size=140))
_PAIRS = st.lists(st.tuples(_TEXT, _TEXT), max_size=9)


@st.composite
def keys(draw: st.DrawFn) -> bytes:
    """A series key: string attributes as protobuf writes them, sometimes another kind of value, flags,
    or the bytes cut or altered (what a sender may put after a point's canonical prefix)."""
    dp = NumberDataPoint()
    for key, value in draw(_PAIRS):
        kv = dp.attributes.add(key=key)
        if draw(st.integers(0, 9)) == 0:
            kv.value.int_value = len(value)
        else:
            kv.value.string_value = value
    if draw(st.integers(0, 9)) == 0:
        dp.flags = 1
    key = identity_key(dp)
    change = draw(st.sampled_from(["none"] * 6 + ["cut", "flip", "random"]))
    if change == "cut" and key:
        key = key[: draw(st.integers(0, len(key) - 1))]
    elif change == "flip" and key:
        at = draw(st.integers(0, len(key) - 1))
        key = key[:at] + bytes((key[at] ^ draw(st.integers(1, 255)),)) + key[at + 1 :]
    elif change == "random":
        key = draw(st.binary(max_size=40))
    return key


def _cold(cold: bool) -> None:
    if cold:
        pieces._by_field.clear()


@needs_native
@PROPERTIES
@given(keys(), st.booleans(), st.sampled_from([0, 1, 1 << 20]))
def test_received_given_in_c_is_the_python_one(key: bytes, cold: bool, limit: int) -> None:
    """`limit`: the fields' cache size from which C leaves a miss to Python's `_parsed` (0: always)."""
    _cold(cold)
    python = pieces.received_given_py(key)
    cached = dict(pieces._by_field)  # what Python's parse left in the cache
    _cold(cold)
    assert native.EXTENSION is not None
    c = native.EXTENSION.received_given(key, pieces._by_field, pieces._parsed, limit)
    assert c == python
    assert pieces._by_field == cached
    if python is not None:  # the statement itself: what protobuf reads from the same bytes
        dp = NumberDataPoint.FromString(key)
        assert [(p[3], p[4]) for p in python[0]] == [(kv.key, kv.value.string_value) for kv in dp.attributes]
        assert python[1] == {kv.key: kv.value.string_value for kv in dp.attributes}
        assert b"".join(p[0] for p in python[0]) == key
        assert not dp.flags


_ENCODED = st.lists(st.tuples(_WORDS, _TEXT), max_size=8).map(pieces.pieces)


@needs_native
@PROPERTIES
@given(
    st.dictionaries(_WORDS, _TEXT, max_size=4),
    st.lists(st.one_of(_ENCODED, _ENCODED.map(tuple)), max_size=3).map(tuple),
    _ENCODED,
)
def test_joined_in_c_is_the_python_one(
    given_attrs: dict[str, str], computed: pieces.Computed, services: list[pieces.Pieces]
) -> None:
    python = pieces.joined_py(given_attrs, computed, services)
    assert native.EXTENSION is not None
    c = native.EXTENSION.joined(given_attrs, computed, services)
    assert c == python
    added, attrs, extra = python  # the statement: what protobuf reads from the joined fields
    expected = [p for seq in computed for p in seq if p[3] not in given_attrs] + services
    assert added == expected
    assert attrs == {**given_attrs, **{p[3]: p[4] for p in expected}}
    assert list(attrs)[: len(given_attrs)] == list(given_attrs)
    dp = NumberDataPoint.FromString(extra)
    assert [(kv.key, kv.value.string_value) for kv in dp.attributes] == [(p[3], p[4]) for p in expected]


@needs_native
def test_the_core_uses_them_when_built() -> None:
    """The core's path takes the C ones when the extension is in use (else the Python ones)."""
    use = native.MODULE is not None
    assert (pieces._C_RECEIVED is not None) == use
    assert (pieces._C_JOINED is not None) == use


@needs_native
def test_a_bad_piece_is_a_type_error() -> None:
    assert native.EXTENSION is not None
    with pytest.raises(TypeError):
        native.EXTENSION.joined({}, ((("a", "b"),),), [])
    with pytest.raises(TypeError):
        native.EXTENSION.received_given(b"\x3a\x00", {b"\x3a\x00": ("x",)}, pieces._parsed, 1 << 20)


# any text: escapes, control characters, DEL, non-ASCII, long (lengths of two varint bytes), lone surrogates
_ANY_TEXT = st.one_of(
    _TEXT,
    st.text(alphabet=st.characters(codec=None), max_size=20),
    st.text(alphabet=st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=3),
    st.text(max_size=300),
)


@needs_native
@PROPERTIES
@given(_ANY_TEXT, _ANY_TEXT)
def test_encoded_in_c_is_the_python_one(key: str, value: str) -> None:
    assert native.EXTENSION is not None
    c = native.EXTENSION.encoded(key, value)
    try:
        python = pieces._encoded_py(key, value)
    except UnicodeEncodeError:
        assert c is None  # the Python one raises, and so does `_encoded` then
        return
    assert c == python
    point, log, member, k, v = python  # the statement: protobuf and JSON read the same pair back
    assert (k, v) == (key, value)
    dp = NumberDataPoint.FromString(point)
    assert [(kv.key, kv.value.string_value) for kv in dp.attributes] == [(key, value)]
    assert log == b"\x32" + point[1:]
    assert member == b"," + orjson.dumps(key) + b":" + orjson.dumps(value)
    assert json.loads(b"{" + member[1:] + b"}") == {key: value}


@needs_native
@PROPERTIES
@given(
    st.lists(st.tuples(_WORDS, _ANY_TEXT), max_size=12),
    st.randoms(use_true_random=False),
    st.sampled_from([None, flowlogs._JSON_HEAD, b"", b"{"]),
    st.one_of(st.none(), _ANY_TEXT),
)
def test_rendered_in_c_is_the_python_one(
    pairs: list[tuple[str, str]], rnd: random.Random, json_head: bytes | None, body: str | None
) -> None:
    try:
        encoded = pieces.pieces(pairs)
    except UnicodeEncodeError:
        return
    order = list(range(len(encoded))) * rnd.randint(0, 2)  # any order, repeats and gaps too
    rnd.shuffle(order)
    order = order[: rnd.randint(0, len(order))]
    assert native.EXTENSION is not None
    try:
        python = flowlogs.rendered_py(encoded, tuple(order), json_head, body)
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            native.EXTENSION.rendered(encoded, tuple(order), json_head, flowlogs._HEAD_BEFORE_BODY, body,
                                      flowlogs._HEAD_AFTER_BODY)  # fmt: skip
        return
    c = native.EXTENSION.rendered(
        encoded, tuple(order), json_head, flowlogs._HEAD_BEFORE_BODY, body, flowlogs._HEAD_AFTER_BODY
    )
    assert c == python
    json_prefix, otlp = python  # the statement: JSON and protobuf read the attributes back
    ordered = [encoded[i] for i in order]
    if json_head == flowlogs._JSON_HEAD and len({p[3] for p in ordered}) == len(ordered):
        line = json.loads(json_prefix + b"}")
        assert line == {"event": schema.FLOW_LOG_EVENT_NAME, **{p[3]: p[4] for p in ordered}}
    if body is None:
        assert otlp == b""
    else:
        record = LogRecord.FromString(otlp)
        assert record.body.string_value == body
        assert record.event_name == schema.FLOW_LOG_EVENT_NAME
        assert [(kv.key, kv.value.string_value) for kv in record.attributes] == [
            (p[3], p[4]) for p in ordered
        ]


@needs_native
@pytest.mark.parametrize("limit", [0, 1 << 20])
def test_every_byte_of_a_field_changed(limit: int) -> None:
    """Each byte of received fields (tags, every length, text) changed by small steps and into other
    kinds: C and Python answer the same (a length that no longer fits the field is no field of theirs)."""
    assert native.EXTENSION is not None
    dp = NumberDataPoint()
    for key, value in (("source.address", "10.0.0.1"), ("k", "é"), ("a", "")):
        dp.attributes.add(key=key).value.string_value = value
    key = identity_key(dp)
    for at in range(len(key)):
        for step in (1, 2, 3, 0x7F, 0x80, 0xFE, 0xFF):
            changed = key[:at] + bytes(((key[at] + step) & 0xFF,)) + key[at + 1 :]
            pieces._by_field.clear()
            python = pieces.received_given_py(changed)
            cached = dict(pieces._by_field)
            pieces._by_field.clear()
            assert native.EXTENSION.received_given(changed, pieces._by_field, pieces._parsed, limit) == python
            assert pieces._by_field == cached, (at, step)
