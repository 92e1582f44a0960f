"""A series' header (Sum.data_points tag and the enriched point's length) for any point length: what
protobuf reads back, one object shared by the series of one length where it is cached."""

from __future__ import annotations

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import Sum

from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.enricher.state.series import Series
from otel_kzt.schema import TrafficClass

EXTRA = b"\x3a\x05\x0a\x01k\x12\x00"  # one added attribute: key "k", no value


def _series(point_len: int) -> Series:
    series = Series(1, Resolved(EXTRA, {}, TrafficClass.UNKNOWN, None), (), None)
    series.set_point_len(point_len)
    return series


@pytest.mark.parametrize("point_len", [0, 1, 120, 121, 0x3FF8, 0x3FF9, 0x4000, 0x1FFFFF, 0x200000])
def test_the_header_reads_back_as_the_enriched_point(point_len: int) -> None:
    _series(point_len)
    series = _series(point_len)  # the second of its length: a cached header where one is
    enriched = point_len + len(EXTRA)
    assert series.size == len(series.header) + enriched
    # a point of exactly that length: flags fields (0), one written in 3 bytes for an odd length
    odd = b"\x38\x80\x00" if point_len % 2 else b""
    point = odd + b"\x38\x00" * ((point_len - len(odd)) // 2)
    if len(point) != point_len:
        return  # length 1: no such point; the size above is what holds
    read = Sum.FromString(series.header + point + EXTRA)
    assert len(read.data_points) == 1
    assert [kv.key for kv in read.data_points[0].attributes] == ["k"]


def test_series_of_one_length_share_one_header_where_cached() -> None:
    assert _series(200).header is _series(200).header
    assert _series(200).header is not _series(201).header
    assert _series(0x200000).header == _series(0x200000).header


def test_series_of_one_length_share_its_size_and_point_length_ints() -> None:
    a, b = _series(int("300")), _series(int("300"))  # made at run time, above the small-int cache:
    # each int an object of its own unless shared
    assert (
        (a.size, a.point_len, a.plain_len)
        == (b.size, b.point_len, b.plain_len)
        == (len(a.header) + 307, 300, 300)
    )
    assert a.size is b.size and a.point_len is b.point_len and a.plain_len is a.point_len
