"""Each attribute's encodings, made once per (key, value) and shared by the places that read or write
them: the attributes a series' points carry (read from its key: `received`), the ones the enricher adds
(resolution.py) and a billed series' flow-log template (flowlogs.py: its OTLP attribute fields and JSON
members, in sorted key order).

A new series (200k in a 1,000-node cluster's first interval) carries ~8 attributes, gets ~13 added and a
billed one writes all ~21 into its template; addresses, pod, node, zone and workload names repeat across
series, so most are found here, each by one lookup mapped in C over the series' attributes. Bounded:
emptied when full.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Final

import orjson

from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.enricher.processing.protowire import KEY_TAG, STRING_TAG, VALUE_TAG, string_attributes

Pair = tuple[str, str]
# NumberDataPoint.attributes field, LogRecord.attributes field, JSON member (`,"key":"value"`), key, value
Pieces = tuple[bytes, bytes, bytes, str, str]
POINT_FIELD: Final = itemgetter(0)
LOG_FIELD: Final = itemgetter(1)
JSON_MEMBER: Final = itemgetter(2)
KEY: Final = itemgetter(3)
VALUE: Final = itemgetter(4)
_POINT_ATTRIBUTES_TAG: Final = 0x3A  # NumberDataPoint.attributes: field 7, length-delimited
_LOG_ATTRIBUTES_TAG: Final = b"\x32"  # LogRecord.attributes: field 6, length-delimited (same length)
_SHORT: Final = 0x80  # lengths below this take one byte
_MAX_CACHED: Final = 131_072  # per cache: ~30 MB at most
_PAIRS_CAP: Final = Cap("pieces.by_pair", _MAX_CACHED)
_FIELDS_CAP: Final = Cap("pieces.by_field", _MAX_CACHED)
CAPS: Final = (_PAIRS_CAP, _FIELDS_CAP)  # on /metrics (exporters/caches.py)
_by_pair: dict[Pair, Pieces] = {}
_by_field: dict[bytes, Pieces] = {}  # the point field (as received) -> its pieces


def pieces(pairs: Sequence[Pair]) -> list[Pieces]:
    """The encodings of each pair, in order."""
    found = list(map(_by_pair.get, pairs))
    if None in found:
        for i, got in enumerate(found):
            if got is None:
                found[i] = _made(pairs[i])
    return found  # type: ignore[return-value]  # every None replaced


def received(key: bytes) -> list[Pieces] | None:
    """The attributes of a series key (what follows a canonical point's times and value: its attributes
    and flags as encoded) with their pieces, when the key is only string attributes written as protobuf
    writes them, each shorter than 128 bytes (what agents send); None for any other key (flags, another
    kind of value, long values: the caller decodes it)."""
    fields, pos, end = [], 0, len(key)
    while pos < end:
        if key[pos] != _POINT_ATTRIBUTES_TAG or pos + 1 == end or key[pos + 1] >= _SHORT:
            return None
        after = pos + 2 + key[pos + 1]
        fields.append(key[pos:after])
        pos = after
    if pos != end:
        return None
    found = list(map(_by_field.get, fields))
    if None in found:
        for i, got in enumerate(found):
            if got is None:
                parsed = _parsed(fields[i])
                if parsed is None:
                    return None
                found[i] = parsed
    return found  # type: ignore[return-value]  # every None replaced


def _parsed(field: bytes) -> Pieces | None:
    """A point field `0x3a L (0x0a len key) (0x12 len (0x0a len value))`, every length one byte."""
    size = len(field)
    key_len = field[3] if size > 3 and field[2] == KEY_TAG else _SHORT
    value_at = 4 + key_len
    # an empty key is not written by protobuf (proto3): `0a 00` would not be the field as it writes it
    if not 0 < key_len < _SHORT or size < value_at + 4 or field[value_at] != VALUE_TAG:
        return None
    any_len, string_len = field[value_at + 1], field[value_at + 3]
    if field[value_at + 2] != STRING_TAG or any_len != size - value_at - 2 or string_len != any_len - 2:
        return None
    try:
        key, value = field[4:value_at].decode(), field[value_at + 4 :].decode()
    except UnicodeDecodeError:
        return None
    # The checks above make `field` the one encoding protobuf (and `_made`) writes for (key, value), so
    # its pieces are made from it, apart from the added pairs' cache: the received fields of 100k series
    # (an address, pod and uid per pod) would crowd that cache out and have it emptied again and again.
    _FIELDS_CAP.room(_by_field)
    made = _by_field[field] = (field, _LOG_ATTRIBUTES_TAG + field[1:], _member(key, value), key, value)
    return made


def _made(pair: Pair) -> Pieces:
    _PAIRS_CAP.room(_by_pair)
    key, value = pair
    point = string_attributes((pair,), _POINT_ATTRIBUTES_TAG)  # tag, length, KeyValue
    made = _by_pair[pair] = (point, _LOG_ATTRIBUTES_TAG + point[1:], _member(key, value), key, value)
    return made


def _member(key: str, value: str) -> bytes:
    """The JSON member `,"key":"value"` as orjson writes it."""
    return b"," + orjson.dumps(key) + b":" + orjson.dumps(value)
