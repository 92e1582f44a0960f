"""Hand-encoded protobuf pieces for the hot paths (concatenating serialised messages merges them).

The core rebuilds an enriched request by splitting containers into fields and re-wrapping the ones it
changed; the flow logs append a few KeyValues. Tests compare each piece against the protobuf library.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Final

_ATTRIBUTES_TAG_LOG: Final = 0x32  # LogRecord.attributes: field 6, length-delimited
# The tags of a string attribute (KeyValue{key, AnyValue{string_value}}): pieces.py reads them, flowlogs.py
# writes a string AnyValue
KEY_TAG: Final = 0x0A  # KeyValue.key: field 1
VALUE_TAG: Final = 0x12  # KeyValue.value: field 2 (AnyValue)
STRING_TAG: Final = 0x0A  # AnyValue.string_value: field 1
_INT_TAG: Final = 0x18  # AnyValue.int_value: field 3, varint
_DOUBLE_TAG: Final = 0x21  # AnyValue.double_value: field 4, fixed64
_SMALL: Final = [bytes((i,)) for i in range(0x80)]
_SMALL_INTS: Final = 0x4000  # AttributeEncoder.int_values's table: the one- and two-byte varints


def varint(n: int) -> bytes:
    """Unsigned LEB128; negative int64 values use their two's complement, as protobuf does."""
    if 0 <= n < 0x80:
        return _SMALL[n]
    if 0 < n < 0x4000:  # the common sizes unrolled: lengths and per-interval counts
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if 0 < n < 0x200000:
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + varint(len(payload)) + payload


class AttributeEncoder:
    """Encodes one LogRecord attribute `key` with an int or double value; the constant part is built once.

    An int KeyValue is `head[k] + varint(value)`, where the head for a k-byte varint already holds every
    tag and length (all < 128 for our short keys).
    """

    __slots__ = ("_int_heads", "_small", "double_head")

    def __init__(self, key: str) -> None:
        keyfield = length_delimited(KEY_TAG, key.encode())
        self._int_heads = [
            bytes((_ATTRIBUTES_TAG_LOG, len(keyfield) + 3 + k))
            + keyfield
            + bytes((VALUE_TAG, 1 + k, _INT_TAG))
            for k in range(11)
        ]
        self._small: list[bytes] = []  # the KeyValues of 0 .. _SMALL_INTS - 1, made on first use
        # ... and a double one is `double_head + value` (little-endian fixed64), the tag included
        self.double_head = (
            bytes((_ATTRIBUTES_TAG_LOG, len(keyfield) + 11)) + keyfield + bytes((VALUE_TAG, 9, _DOUBLE_TAG))
        )

    def int_value(self, value: int) -> bytes:
        encoded = varint(value)
        return self._int_heads[len(encoded)] + encoded

    def int_values(self, values: Iterable[float]) -> list[bytes]:
        """`int_value` of each value (truncated to int), without a call per value for the common sizes:
        one- and two-byte varints from a table (packet counts), three and four bytes inline (bytes)."""
        if not self._small:
            self._small = [self.int_value(n) for n in range(_SMALL_INTS)]
        small, one, head3, head4 = self._small, self.int_value, self._int_heads[3], self._int_heads[4]
        out: list[bytes] = []
        add = out.append
        for n in map(int, values):
            if 0 <= n < _SMALL_INTS:
                add(small[n])
            elif 0 < n < 0x200000:
                add(head3 + bytes(((n & 0x7F) | 0x80, (n >> 7 & 0x7F) | 0x80, n >> 14)))
            elif 0 < n < 0x10000000:
                add(
                    head4
                    + bytes(((n & 0x7F) | 0x80, (n >> 7 & 0x7F) | 0x80, (n >> 14 & 0x7F) | 0x80, n >> 21))
                )
            else:
                add(one(n))
        return out

    def double_value(self, value: float) -> bytes:
        return self.double_head + struct.pack("<d", value)


def string_attributes(pairs: Iterable[tuple[str, str]], tag: int) -> bytes:
    """KeyValues with string values, each as the repeated field `tag` (NumberDataPoint.attributes is 0x3a,
    LogRecord.attributes 0x32): what protobuf would write, without building messages (the hot paths take
    them cached per pair from pieces.py)."""
    return b"".join([length_delimited(tag, _key_value(*pair)) for pair in pairs])


def _key_value(key: str, value: str) -> bytes:
    any_value = length_delimited(STRING_TAG, value.encode())
    return length_delimited(KEY_TAG, key.encode()) + length_delimited(VALUE_TAG, any_value)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A varint at `pos` -> (value, position after it); at most 10 bytes, as protobuf reads them (garbage
    of 0xff bytes would otherwise be read as one huge number, each byte costing more): ValueError beyond,
    IndexError at the buffer's end."""
    value = shift = 0
    for stop in range(pos + 1, pos + 11):
        b = buf[stop - 1]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, stop
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def skip_field(buf: bytes, pos: int) -> int:
    """The position after the field starting at `pos`."""
    tag, pos = read_varint(buf, pos)
    wire = tag & 7
    if wire == 0:
        return read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        size, pos = read_varint(buf, pos)
        return pos + size
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported protobuf wire type {wire} (groups)")


def spans(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The top-level fields of the message in `buf[pos:end]`, as offsets into `buf`: (field number, field
    start, its payload's start, field end); for a field that is not length-delimited the payload start is
    the end. Nothing is copied: a request's containers are walked in place, only points are sliced."""
    while pos < end:
        start = pos
        tag, body = read_varint(buf, pos)
        if tag & 7 == 2:
            size, body = read_varint(buf, body)
            pos = body + size
        else:
            pos = body = skip_field(buf, start)
        yield tag >> 3, start, body, pos


class Writer:
    """Pieces of one encoded message, with nested length-delimited fields filled in after their content.

    Every level appends to the same list, so the enriched request is joined (copied) exactly once.
    """

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        self.parts.append(piece)
        self.size += len(piece)

    def open(self) -> tuple[int, int]:
        """Reserve the header slot of a nested field; returns what `close` needs."""
        self.parts.append(b"")
        return len(self.parts) - 1, self.size

    def close(self, tag: int, mark: tuple[int, int]) -> None:
        slot, size_before = mark
        header = bytes((tag,)) + varint(self.size - size_before)
        self.parts[slot] = header
        self.size += len(header)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)
