"""A new flow's common case in C (processing/_native_new.c) gives what the Python statements give:
`Resolver._ends_of` (both ends cached and in their windows, each a pod or node), `Resolved.slim` and a new
`Series` made from a prototype's slots. Hypothesis drives both ways on generated ends, namings and series
and compares them field by field; the ends' common case must be taken by C (not left to Python).

In CI (CI=true) the extension must be built: a missing one fails here, it is not skipped."""

from __future__ import annotations

import dataclasses
import gc
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_kzt import schema
from otel_kzt.enricher.processing import native, resolution
from otel_kzt.enricher.processing.resolution import Resolved, Resolver, _End
from otel_kzt.enricher.state import series
from otel_kzt.enricher.state.series import Series, new_series
from otel_kzt.k8s.model import Endpoint, NodeInfo
from otel_kzt.schema import TrafficClass, WorkloadKind

needs_native = pytest.mark.skipif(
    not native.BUILT and os.environ.get("CI") != "true", reason=f"C extension not built: {native.PATH}"
)
PROPERTIES = settings(max_examples=400, derandomize=True, deadline=None)
_ADDRESSES = ("10.0.0.1", "10.0.0.2", "", "169.254.0.1", "10.0.0.3")
_NAMES = st.sampled_from([None, "", "n1", "n2"])
_ZONES = st.sampled_from([None, "", "a", "b"])
_TIMES = st.sampled_from([-math.inf, 0.0, 5.0, 10.0, math.inf])


class _Index:
    """A metadata index whose every lookup misses (an end Python makes itself: not one C could take)."""

    generation = 7

    def lookup(self, address: str, at: float | None) -> Endpoint | None:
        return None

    def lookup_window(self, address: str, at: float | None) -> tuple[Endpoint | None, float, float]:
        return None, -math.inf, math.inf

    def node(self, name: str) -> NodeInfo | None:
        return None


@st.composite
def ends(draw: st.DrawFn) -> _End:
    """A cached end: no endpoint, a pod or a node, with or without its node's zone and region, a window
    (mostly a pod or node with its node, zones and regions few: the common case's every branch is drawn)."""
    endpoint = None
    if draw(st.integers(0, 4)):
        endpoint = draw(st.builds(Endpoint, _NAMES, st.sampled_from(list(WorkloadKind)), st.just("w")))
    node = None
    if draw(st.integers(0, 4)):
        node = draw(st.builds(NodeInfo, st.just("n"), _ZONES, _ZONES, _ZONES, st.just(())))
    lo, hi = -math.inf, math.inf
    if not draw(st.integers(0, 3)):
        lo, hi = sorted((draw(_TIMES), draw(_TIMES)))
    return _End(endpoint, node, lo, hi)


def _resolver(cached: dict[str, _End]) -> Resolver:
    resolver = Resolver(_Index(), ["10.0.0.0/8"])  # type: ignore[arg-type]
    resolver._ends, resolver._ends_generation = dict(cached), _Index.generation
    return resolver


@needs_native
@PROPERTIES
@given(
    st.dictionaries(st.sampled_from(_ADDRESSES), ends(), min_size=2, max_size=5),
    st.sampled_from(_ADDRESSES[:4]),
    st.sampled_from(_ADDRESSES[:4]),
    st.one_of(st.sampled_from([-1.0, 0.0, 5.0, 7.5, 10.0, 1e12]), st.floats(allow_nan=False)),
)
def test_ends_in_c_are_the_python_ones(cached: dict[str, _End], src: str, dst: str, at: float) -> None:
    given_attrs = {schema.SOURCE_ADDRESS: src, schema.DESTINATION_ADDRESS: dst}
    python_resolver = _resolver(cached)
    python_resolver._native_ends = None
    python = python_resolver._ends_of(given_attrs, True, at, "")
    assert native.EXTENSION is not None
    c = native.EXTENSION.ends(_resolver(cached)._ends, src, dst, at, resolution._CLASSES)
    common = all(
        a in cached and cached[a].endpoint is not None and cached[a].valid_from <= at < cached[a].valid_until
        for a in (src, dst)
    )
    assert (c is not None) == common  # the common case is C's, the rest Python's
    _SEEN.add(c[0] if c is not None else None)
    if c is not None:
        assert c[0] is python[0]
        assert c[1] is python[1] is cached[src]
        assert c[2] is python[2] is cached[dst]
    c_resolver = _resolver(cached)  # the resolver's own path, C first, gives Python's answer
    assert c_resolver._native_ends is not None
    assert _answer(c_resolver._ends_of(given_attrs, True, at, "")) == _answer(python)


_SEEN: set[TrafficClass | None] = set()  # the classes C gave (checked after the property's examples)


@needs_native
def test_ends_drew_every_class_c_gives() -> None:
    """The property above, run again, sees C give each class it can and leave cases to Python."""
    _SEEN.clear()
    test_ends_in_c_are_the_python_ones()
    assert {None, *resolution._CLASSES} <= _SEEN


def _answer(found: tuple[TrafficClass, _End, _End]) -> tuple[object, ...]:
    """A class and two ends, each end by what it holds (the Python way makes new ones on a miss)."""
    cls, *pair = found
    return (cls, *((e.endpoint, e.node, e.valid_from, e.valid_until) for e in pair))


@needs_native
def test_ends_leave_another_generation_and_time_less_queries_to_python() -> None:
    """A cache of another generation is never read by C; no time ("now") is Python's too."""
    pod = Endpoint("n1", WorkloadKind.DEPLOYMENT, "w", "p")
    cached = {"10.0.0.1": _End(pod, None), "10.0.0.2": _End(pod, None)}
    given_attrs = {schema.SOURCE_ADDRESS: "10.0.0.1", schema.DESTINATION_ADDRESS: "10.0.0.2"}
    resolver = _resolver(cached)
    assert resolver._ends_of(given_attrs, True, 1.0, "")[0] is TrafficClass.SAME_NODE
    resolver._ends_generation = 6  # the index moved on: the cache is dropped, the ends looked up again
    cls, src, _ = resolver._ends_of(given_attrs, True, 1.0, "")
    assert cls is TrafficClass.UNKNOWN and src.endpoint is None  # (a cluster address the index lacks)
    resolver = _resolver(cached)
    assert resolver._ends_of(given_attrs, True, None, "")[0] is TrafficClass.SAME_NODE


_KEYS = st.sampled_from([*resolution._SLIM_KEYS, schema.SOURCE_POD_NAME, "other"])


@st.composite
def namings(draw: st.DrawFn) -> Resolved:
    lo, hi = sorted((draw(_TIMES), draw(_TIMES)))
    return Resolved(
        extra=draw(st.binary(max_size=8)),
        attrs=draw(st.dictionaries(_KEYS, st.text(max_size=3), max_size=8)),
        traffic_class=draw(st.sampled_from(list(TrafficClass))),
        provider=draw(st.sampled_from([None, "aws"])),
        basis=draw(st.sampled_from([(), (True, None)])),
        valid_from=lo,
        valid_until=hi,
        source_node=draw(st.sampled_from(["", "n1"])),
    )


def _fields(obj: object) -> list[tuple[str, object]]:
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]  # type: ignore[arg-type]


@needs_native
@PROPERTIES
@given(namings())
def test_slim_in_c_is_the_python_one(resolved: Resolved) -> None:
    c, python = resolved.slim(), resolved.slim_py()
    assert type(c) is Resolved and c is not resolved
    assert _fields(c) == _fields(python)
    assert list(c.attrs.items()) == list(python.attrs.items())  # the same order too
    assert c.attrs is not resolved.attrs
    for name, value in _fields(c):
        if name != "attrs":
            assert value is getattr(resolved, name)
    assert gc.is_tracked(c)


@needs_native
def test_slim_of_another_mapping_is_the_python_one() -> None:
    resolved = Resolved(b"", _Attrs({schema.SOURCE_PORT: "1", "x": "2"}), TrafficClass.UNKNOWN, None)
    assert resolved.slim().attrs == {schema.SOURCE_PORT: "1"}


class _Attrs(dict[str, str]):
    """Another mapping (C cuts only a dict)."""


class _Plain:
    x = None


@needs_native
@PROPERTIES
@given(
    st.integers(-3, 9),
    namings(),
    st.sampled_from([(), ((None, ("a",), 1.0),)]),
    st.sampled_from([None, "template"]),
    st.integers(0, 300),
)
def test_a_new_series_in_c_is_the_dataclass_one(
    generation: int, resolved: Resolved, targets: tuple, template: object, point_len: int
) -> None:
    c = new_series(generation, resolved, targets, template, point_len)  # type: ignore[arg-type]
    python = new_series(generation, resolved, targets, template, point_len, native_path=False)  # type: ignore[arg-type]
    assert type(c) is Series
    assert _fields(c) == _fields(python)
    assert c.resolved is resolved and c.targets is targets and c.template is template
    assert c.acc == [] and c.acc is not series._PROTOTYPE.acc  # a list of its own, as the factory gives
    assert gc.is_tracked(c)
    c.acc.append(1.0)
    c.start, c.seen = 5, 1.0
    assert _fields(series._PROTOTYPE) == _fields(Series(0, series._PROTOTYPE.resolved, (), None))


@needs_native
def test_the_core_uses_them_when_built() -> None:
    use = native.MODULE is not None
    assert (resolution._ENDS is not None) == use
    assert (resolution._SLIM is not None) == use
    assert (series._COPIED is not None) == use


@needs_native
def test_bad_arguments_are_type_errors() -> None:
    assert native.EXTENSION is not None
    with pytest.raises(TypeError):
        native.EXTENSION.slots_of(_Plain, ("x",))  # instances with a __dict__
    with pytest.raises(TypeError):
        native.EXTENSION.slots_of(Resolved, ("slim",))
    with pytest.raises(TypeError):
        native.EXTENSION.copied(object(), (), ())
    with pytest.raises(ValueError):
        native.EXTENSION.copied(series._PROTOTYPE, (8,), (1,))
    with pytest.raises(TypeError):
        native.EXTENSION.ends({}, "a", "b", 1.0, ())
