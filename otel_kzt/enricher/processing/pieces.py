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

from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Final

import orjson

from otel_kzt.enricher.processing import native
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


Given = tuple[list[Pieces], dict[str, str]]
Joined = tuple[list[Pieces], dict[str, str], bytes]
# the C extension's versions of the two below (processing/_native_named.c), None: the Python ones
Computed = tuple[Iterable[Pieces], ...]
_CReceived = Callable[[bytes, dict[bytes, Pieces], Callable[[bytes], Pieces | None], int], Given | None]
_CJoined = Callable[[dict[str, str], Computed, Sequence[Pieces]], Joined]
_C_RECEIVED: Final[_CReceived | None] = None if native.MODULE is None else native.MODULE.received_given
_C_JOINED: Final[_CJoined | None] = None if native.MODULE is None else native.MODULE.joined
_C_ENCODED: Final[Callable[[str, str], Pieces | None] | None] = (
    None if native.MODULE is None else native.MODULE.encoded
)


def received_given(key: bytes) -> Given | None:
    """`received`, and the attributes it reads as a dict (key -> value, in order): what a new series is
    named from. The C extension's (the default when built: native.py) or `received_given_py`."""
    if _C_RECEIVED is not None:
        return _C_RECEIVED(key, _by_field, _parsed, _FIELDS_CAP.limit)
    return received_given_py(key)


def received_given_py(key: bytes) -> Given | None:
    """`received_given` in Python: the statement (_native_named.c `received_given` is its loop in C)."""
    carried = received(key)
    if carried is None:
        return None
    return carried, dict(zip(map(KEY, carried), map(VALUE, carried), strict=True))


def joined(given: Mapping[str, str], computed: Computed, services: Sequence[Pieces]) -> Joined:
    """What a flow's ends add to its `given` attributes: (the pieces of `computed`, in order, whose key
    `given` lacks, then every piece of `services`; `given` updated by those; their point fields joined).
    The C extension's (the default when built) or `joined_py`."""
    if _C_JOINED is not None and type(given) is dict:
        return _C_JOINED(given, computed, services)
    return joined_py(given, computed, services)


def joined_py(given: Mapping[str, str], computed: Computed, services: Sequence[Pieces]) -> Joined:
    """`joined` in Python: the statement (_native_named.c `joined` is its loop in C)."""
    added = [p for pieces_ in computed for p in pieces_ if KEY(p) not in given]
    added += services
    attrs = dict(given)
    attrs.update(zip(map(KEY, added), map(VALUE, added), strict=True))
    return added, attrs, b"".join(map(POINT_FIELD, added))


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
    # The checks above make `field` the one encoding protobuf (and `_encoded`) writes for (key, value), so
    # its pieces are made for it, apart from the added pairs' cache: the received fields of 100k series
    # (an address, pod and uid per pod) would crowd that cache out and have it emptied again and again.
    _FIELDS_CAP.room(_by_field)
    made = _by_field[field] = _encoded(key, value)
    return made


def _made(pair: Pair) -> Pieces:
    _PAIRS_CAP.room(_by_pair)
    made = _by_pair[pair] = _encoded(*pair)
    return made


def _encoded(key: str, value: str) -> Pieces:
    """One string attribute's pieces: the C extension's `encoded` (the default when built) or
    `_encoded_py` (which also raises for a string with no UTF-8 form)."""
    made = None if _C_ENCODED is None else _C_ENCODED(key, value)
    return _encoded_py(key, value) if made is None else made


def _encoded_py(key: str, value: str) -> Pieces:
    """The statement (_native_named.c `encoded` is the same in C)."""
    point = string_attributes(((key, value),), _POINT_ATTRIBUTES_TAG)  # tag, length, KeyValue
    return (point, _LOG_ATTRIBUTES_TAG + point[1:], _member(key, value), key, value)


def _member(key: str, value: str) -> bytes:
    """The JSON member `,"key":"value"` as orjson writes it."""
    return b"," + orjson.dumps(key) + b":" + orjson.dumps(value)
