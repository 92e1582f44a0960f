"""A Sum that comes again in the shape of its group's previous one: read in bulk and checked whole.

Agents send the same series in the same order every interval, so a Sum differs from the previous one of
its group (resource, metric) only in the start, time and value of each point. After a general pass in
which every point took the plain path (points.py: a series tracked and named as of its point, counted or
idle, no rename; new series of a first interval too), the group keeps that pass's `Layout`: where its
points lie, their series and the cached pieces of their enriched form. The next Sum of the group is read
with one struct call (each point's header bytes as integers, then its bytes), and used only when it is
exactly that shape: same length, headers, tags, series keys and trailing fields, every time inside every
series' window, no negative value. Only then are its points counted, one rule call each
(state/counting.py, unchanged); its enriched form is the cached headers and added attributes interleaved
with the received points. Any other Sum takes the general pass, before anything is counted.

A layout holds while its series' namings do: they change only in a pass over the group (which replaces
or drops the layout, points.py), when the metadata generation moves (checked per Sum), or when series are
forgotten (the series table's epoch moves).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Final

from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.enricher.state.series import CANONICAL_POINT, Series

_UNPACK_CANONICAL: Final = CANONICAL_POINT.unpack_from
_START_TAG, _TIME_TAG, _INT_TAG = 0x11, 0x19, 0x31  # the tags of a canonical point's first 27 bytes
# A point of the plain path as the general pass saw it: its header's start, its start, series and key.
Seen = tuple[int, int, Series, bytes]
_HEAD, _POINT, _ENTRY, _KEY = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)
_HEADER, _EXTRA, _SIZE = attrgetter("header"), attrgetter("resolved.extra"), attrgetter("size")
_VALID_FROM, _VALID_UNTIL = attrgetter("valid_from"), attrgetter("valid_until")


class _Codes(dict[int, str]):
    """The reader's struct codes of one point (its header bytes, then its bytes) by its key's length."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def __missing__(self, key_len: int) -> str:
        _CODES_CAP.room(self)
        code = self[key_len] = f"{self.width}B{key_len + CANONICAL_POINT.size}s"
        return code


_CODES_CAP: Final = Cap("repeats.codes", 4096)  # key lengths remembered per header width
_CODES: dict[int, _Codes] = {}  # by header width (bytes of tag and length: 2 or 3 in practice)
_HEADERS_CAP: Final = Cap("repeats.headers", 4096)  # received point headers shared by the layouts
_HEADERS: dict[bytes, bytes] = {}


def _shared_header(header: bytes) -> bytes:
    """One bytes object per received point header (Sum.data_points tag and length)."""
    shared = _HEADERS.get(header)
    if shared is None:
        _HEADERS_CAP.room(_HEADERS)
        shared = _HEADERS[header] = header
    return shared


CAPS: Final = (_CODES_CAP, _HEADERS_CAP)  # on /metrics (exporters/caches.py)
# _native_layout.c `read_layout`: (buf, body, end, received headers, keys, trailer, lo, hi) -> `read`'s answer
CRead = Callable[..., tuple[tuple[bytes, ...], list[int]] | None]


class Layout:
    """The shape of one group's Sum and the cached pieces of its enriched form."""

    __slots__ = (
        "_heads",
        "_reader",
        "c_read",
        "distinct",
        "entries",
        "extras",
        "generation",
        "headers",
        "hi",
        "keys",
        "lo",
        "points",
        "received",
        "size",
        "trailer",
        "valid_from",
        "valid_until",
        "width",
    )

    def __init__(
        self, generation: int, buf: bytes, seen: list[Seen], trailer: bytes, c_read: CRead | None = None
    ) -> None:
        """From a general pass's plain points (see `layout`) and the Sum's fields after them, in metadata
        `generation`; `c_read`: `read` in C (processing/_native_layout.c), None: in Python."""
        self.generation, self.c_read = generation, c_read
        self.width = seen[0][1] - seen[0][0]  # header bytes per point
        self.points = len(seen)
        # mapped C calls rather than a generator per field: a layout is made per group in the first
        # interval (2,000 of 100 points in a 1,000-agent cluster)
        self.entries = entries = tuple(map(_ENTRY, seen))
        self.keys = tuple(map(_KEY, seen))
        self.distinct = len(set(self.keys)) == len(self.keys)  # no series twice (flow-log pairing)
        self.headers = tuple(map(_HEADER, entries))
        self.extras = tuple(map(_EXTRA, entries))
        self.trailer = trailer
        # each point's received header (tag and length: all of one width, `layout` checks), one shared
        # bytes object per value (a few lengths recur over a cluster's 2,000 layouts of 100 points)
        headers = map(buf.__getitem__, map(slice, map(_HEAD, seen), map(_POINT, seen)))
        self.received = tuple(map(_shared_header, headers))
        self.size = sum(map(_SIZE, entries)) + len(trailer)
        self.valid_from = max(map(_VALID_FROM, entries))
        self.valid_until = min(map(_VALID_UNTIL, entries))
        # for the C reader (processing/_native_layout.c): the times allowed as the closed range a fixed64
        # can fall in
        self.lo, self.hi = max(self.valid_from, 0), min(self.valid_until, 1 << 64) - 1
        # the Python reader's struct and expected header bytes: made on its first `read` (with the C
        # reader, never: a struct of 100 codes per layout was ~0.15 KB per flow at cluster scale)
        self._reader: struct.Struct | None = None
        self._heads: tuple[tuple[int, ...], ...] = ()

    @property
    def reader(self) -> struct.Struct:
        """The Python reader: one struct call reads each point's header bytes as integers, then its bytes
        (and the trailer)."""
        if self._reader is None:
            codes = _CODES.get(self.width) or _CODES.setdefault(self.width, _Codes(self.width))
            fmt = "".join(map(codes.__getitem__, map(len, self.keys)))
            trailer = self.trailer
            self._reader = struct.Struct(f"<{fmt}{len(trailer)}s" if trailer else f"<{fmt}")
        return self._reader

    @property
    def heads(self) -> tuple[tuple[int, ...], ...]:
        """Per header byte position, the value every point has there."""
        if not self._heads:
            self._heads = tuple(zip(*self.received, strict=True))
        return self._heads

    def read(self, buf: bytes, body: int, end: int) -> tuple[tuple[bytes, ...], list[int]] | None:
        """The Sum at buf[body:end] as (each point's bytes, its 27-byte prefixes' fields flat), when it
        is exactly this shape; None otherwise. processing/_native_layout.c `read_layout` gives the same
        answer in C (the core's default when built: points.py)."""
        if self.c_read is not None:
            return self.c_read(buf, body, end, self.received, self.keys, self.trailer, self.lo, self.hi)
        reader, n, step = self.reader, self.points, self.width + 1
        if end - body != reader.size:
            return None
        fields = reader.unpack_from(buf, body)
        last = n * step
        for i, expected in enumerate(self.heads):
            if fields[i:last:step] != expected:
                return None
        if self.trailer and fields[-1] != self.trailer:
            return None
        raws: tuple[bytes, ...] = fields[self.width : last : step]
        if not all(map(bytes.endswith, raws, self.keys)):  # each point's length is its key's + 27
            return None
        flat = list(chain.from_iterable(map(_UNPACK_CANONICAL, raws)))
        if (
            flat[0::6].count(_START_TAG) != n
            or flat[2::6].count(_TIME_TAG) != n
            or flat[4::6].count(_INT_TAG) != n
        ):
            return None
        times = flat[3::6]
        if min(times) < self.valid_from or max(times) >= self.valid_until or min(flat[5::6]) < 0:
            return None
        return raws, flat

    def enriched(self, raws: tuple[bytes, ...]) -> chain[bytes]:
        """The enriched points, as pieces: cached header, the received point, the added attributes."""
        return chain.from_iterable(zip(self.headers, raws, self.extras, strict=True))


def layout(
    generation: int,
    part: tuple[bytes, int, int],
    seen: list[Seen],
    trailer: bytes,
    c_read: CRead | None = None,
) -> Layout | None:
    """The layout of the Sum at `part` (buffer, start, end) whose points, all plain, lie one after the
    other from its start with headers of one length, its other fields after them; None for any other."""
    buf, body, end = part
    if not seen or seen[0][0] != body:
        return None
    width, expected = seen[0][1] - seen[0][0], body
    for head, point, _, key in seen:
        if head != expected or point - head != width:
            return None
        expected = point + CANONICAL_POINT.size + len(key)
    if expected + len(trailer) != end:
        return None
    return Layout(generation, buf, seen, trailer, c_read)
