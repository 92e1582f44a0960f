"""Flow logs: one record per billed flow (cross-zone, cross-region, external) and reporting interval.

Written as JSON lines (stdout by default) and as OTLP log records for the export endpoints. Bytes and packets
of a flow arrive as two metrics; the core pairs them into one record of the request's `FlowRecords`.
Everything constant about a flow (its attributes, the JSON prefix, the static part of the OTLP record) is
rendered once per series in a `FlowTemplate`; per interval only the numbers are added, for all records of
a request at once: formatted (JSON) or packed (OTLP: one struct call for the times and the two doubles,
the counts' varints) by C calls mapped over the records' columns, and joined once (speed: a record per
billed flow and interval, in the enricher's default configuration).
"""

from __future__ import annotations

import functools
import re
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, repeat
from operator import add, attrgetter, itemgetter, mul
from typing import Any, BinaryIO, Final, TextIO

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO, LogRecord

from otel_kzt import __version__, schema
from otel_kzt.enricher.processing import native
from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.enricher.processing.pieces import JSON_MEMBER, LOG_FIELD, Pieces, pieces
from otel_kzt.enricher.processing.protowire import STRING_TAG, AttributeEncoder, length_delimited, varint
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.schema import TrafficClass

_RESOURCE_LOGS_TAG: Final = 0x0A  # ExportLogsServiceRequest.resource_logs (field 1)
_RESOURCE_TAG: Final = 0x0A  # ResourceLogs.resource (field 1)
_SCOPE_LOGS_TAG: Final = 0x12  # ResourceLogs.scope_logs (field 2)
_SCOPE_TAG: Final = 0x0A  # ScopeLogs.scope (field 1)
_LOG_RECORDS_TAG: Final = 0x12  # ScopeLogs.log_records (field 2, length-delimited)
_TIME_TAG: Final = 0x09  # LogRecord.time_unix_nano (field 1, fixed64)
_OBSERVED_TAG: Final = 0x59  # LogRecord.observed_time_unix_nano (field 11, fixed64)
_BYTES_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_BYTES)
_PACKETS_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_PACKETS)
_COST_HEAD: Final = AttributeEncoder(schema.FLOW_LOG_COST).double_head
_START_HEAD: Final = AttributeEncoder(schema.FLOW_LOG_INTERVAL_START).double_head  # Unix seconds (double)
# time, observed time, then the cost and interval-start attributes (each head ends with the double's tag)
_NUMBERS: Final = struct.Struct(f"<BQBQ{len(_COST_HEAD)}sd{len(_START_HEAD)}sd")
_NUMBERS_PACK: Final = _NUMBERS.pack
_JSON_NUMBERS: Final = (  # the floats as orjson wrote them (JSON reads them back exactly)
    f',"{schema.FLOW_LOG_INTERVAL_START}":%s,"{schema.FLOW_LOG_INTERVAL_END}":%s,'
    f'"{schema.FLOW_LOG_BYTES}":%d,"{schema.FLOW_LOG_PACKETS}":%d,"{schema.FLOW_LOG_COST}":%s}}\n'
).encode()
_JSON_GLUE: Final = tuple(re.split(rb"%[sd]", _JSON_NUMBERS))  # around its 5 numbers, for the C writer


class FlowTemplate:
    """The constant part of one flow's records, rendered once per series and metadata generation.

    A new series costs one (cluster scale: 100k new flows in an agent interval), so the pieces are cached:
    the attributes' sorted order per set of keys (most series share one), each attribute's JSON member and
    protobuf field per (key, value) (pieces.py: pods, workloads, zones repeat), the record head but for its
    body."""

    __slots__ = ("json_prefix", "otlp_fixed", "otlp_static", "traffic_class", "usd_per_byte")

    def __init__(
        self,
        resolved: Resolved,
        usd_per_byte: float,
        *,
        json_lines: bool,
        otlp: bool,
        encoded: Sequence[Pieces] | None = None,
    ) -> None:
        """Render only the forms that are written (each is about a kilobyte per billed series). `encoded`:
        the pieces of `resolved.attrs` in its order, when the caller has them (else looked up)."""
        self.traffic_class: TrafficClass = resolved.traffic_class
        self.usd_per_byte = usd_per_byte
        attrs = resolved.attrs
        keys = tuple(attrs)
        order = _sorted_order(keys)
        body = None
        if otlp:
            body = (
                f"{resolved.traffic_class.value} flow {attrs.get(schema.SOURCE_ADDRESS, '?')} -> "
                f"{attrs.get(schema.DESTINATION_ADDRESS, '?')}"
            )
        # the line up to its numbers, UTF-8 (written to the byte stream as it is); the record but its numbers
        self.json_prefix, self.otlp_static = b"", b""
        if encoded is None or len(encoded) != len(keys) or "event" in attrs:
            values = tuple(attrs.values())
            pairs = [(keys[i], values[i]) for i in order]
            ordered = pieces(pairs) if json_lines or otlp else []
            if json_lines:
                self.json_prefix = _json_prefix_of(attrs, pairs, ordered)
            if body is not None:
                self.otlp_static = rendered(ordered, tuple(range(len(ordered))), None, body)[1]
        elif json_lines or otlp:
            json_head = _JSON_HEAD if json_lines else None
            listed = encoded if type(encoded) is list else list(encoded)
            self.json_prefix, self.otlp_static = rendered(listed, order, json_head, body)
        self.otlp_fixed = len(self.otlp_static) + _NUMBERS.size  # a record's length, but for its counts


def _record_head_parts() -> tuple[bytes, bytes]:
    """A record's static fields before its body (severity number 2, text 3) and after it (event name
    12), encoded once: fields go in number order, the body (5) between them."""
    before = LogRecord(severity_number=SEVERITY_NUMBER_INFO, severity_text="INFO").SerializeToString()
    after = LogRecord(event_name=schema.FLOW_LOG_EVENT_NAME).SerializeToString()
    return before, after


_HEAD_BEFORE_BODY, _HEAD_AFTER_BODY = _record_head_parts()
Rendered = tuple[bytes, bytes]
_C_RENDERED: Final[Callable[..., Rendered] | None] = None if native.MODULE is None else native.MODULE.rendered
_BODY_TAG: Final = 0x2A  # LogRecord.body: field 5 (AnyValue)


def _body_field(text: str) -> bytes:
    return length_delimited(_BODY_TAG, length_delimited(STRING_TAG, text.encode()))


def rendered(
    encoded: list[Pieces], order: tuple[int, ...], json_head: bytes | None, body: str | None
) -> Rendered:
    """A template's JSON prefix (`json_head` and the JSON members of `encoded` in `order`; b"" without a
    head) and OTLP record but for its numbers (with the text `body` and the log fields in `order`; b""
    without a body): the C extension's (the default when built: native.py) or `rendered_py`."""
    if _C_RENDERED is not None:
        return _C_RENDERED(encoded, order, json_head, _HEAD_BEFORE_BODY, body, _HEAD_AFTER_BODY)
    return rendered_py(encoded, order, json_head, body)


def rendered_py(
    encoded: list[Pieces], order: tuple[int, ...], json_head: bytes | None, body: str | None, *,
    before: bytes = _HEAD_BEFORE_BODY, after: bytes = _HEAD_AFTER_BODY,
) -> Rendered:  # fmt: skip
    """`rendered` in Python (`before` and `after`: the record head's parts around its body): the statement
    (_native_named.c `rendered` is the same in C)."""
    ordered = list(map(encoded.__getitem__, order))
    json_prefix = b"" if json_head is None else json_head + b"".join(map(JSON_MEMBER, ordered))
    if body is None:
        return json_prefix, b""
    return json_prefix, b"".join((before, _body_field(body), after, b"".join(map(LOG_FIELD, ordered))))


_JSON_HEAD: Final = orjson.dumps({"event": schema.FLOW_LOG_EVENT_NAME})[:-1]
_ORDERS_CAP: Final = Cap("flowlogs.orders", 65_536)  # sorted key orders (bounded memory)
_orders: dict[tuple[str, ...], tuple[int, ...]] = {}
CAPS: Final = (_ORDERS_CAP,)  # on /metrics (exporters/caches.py)


def _sorted_order(keys: tuple[str, ...]) -> tuple[int, ...]:
    """The keys' positions in sorted key order (what `sorted(attrs.items())` orders by: keys are unique)."""
    order = _orders.get(keys)
    if order is None:
        _ORDERS_CAP.room(_orders)
        order = _orders[keys] = tuple(sorted(range(len(keys)), key=keys.__getitem__))
    return order


def _json_prefix_of(attrs: Mapping[str, str], pairs: list[tuple[str, str]], ordered: list[Pieces]) -> bytes:
    """`{"event":"kzt.flow",` and the attributes in sorted order, as orjson writes that object (without
    its closing brace): their members (`ordered`, their pieces) joined. An attribute named `event` takes
    the event's place, as in a dict: that rare line is written whole (from `pairs`, sorted)."""
    if "event" in attrs:
        return orjson.dumps({"event": schema.FLOW_LOG_EVENT_NAME, **dict(pairs)})[:-1]
    return _JSON_HEAD + b"".join(map(JSON_MEMBER, ordered))


# A billed series' increment: its template, series key, increment, interval start and end (ns)
Billed = tuple[FlowTemplate, bytes, float, int, int]
_seconds: Final = (1e9).__rtruediv__  # ns -> Unix seconds, as `ns / 1e9`, mapped in C
_json_prefix: Final = attrgetter("json_prefix")
_otlp_static: Final = attrgetter("otlp_static")
_otlp_fixed: Final = attrgetter("otlp_fixed")
_usd_per_byte: Final = attrgetter("usd_per_byte")
_TEMPLATE, _KEY, _INC, _SINCE, _T = (itemgetter(i) for i in range(5))


class _Block:
    """Records in columns, in the order they were first seen: a template, an interval (start and end,
    ns), bytes, packets and cost. Made from one metric's billed series (`of`); the other metric's, when
    they are the same series in the same order (the agents' case), fill their column in one go (`pair`)."""

    __slots__ = ("byte_counts", "costs", "ends", "is_bytes", "keys", "packet_counts", "starts", "templates")

    def __init__(self) -> None:
        self.templates: list[FlowTemplate] = []
        self.keys: list[bytes] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.byte_counts: list[float] = []
        self.packet_counts: list[float] = []
        self.costs: list[float] = []
        self.is_bytes: bool | None = None  # of which metric it was made and not paired yet: `pair` may

    @classmethod
    def of(cls, billed: list[Billed], is_bytes: bool) -> _Block:
        """The records of distinct series' increments (the counts as the row-wise sums make them)."""
        block = cls()
        block.templates = list(map(_TEMPLATE, billed))
        block.keys = list(map(_KEY, billed))
        block.starts = list(map(_SINCE, billed))
        block.ends = list(map(_T, billed))
        block.is_bytes = is_bytes
        n = len(billed)
        block.byte_counts, block.packet_counts, block.costs = [0.0] * n, [0.0] * n, [0.0] * n
        block.fill(billed, is_bytes)
        return block

    def pair(self, billed: list[Billed], is_bytes: bool) -> bool:
        """Fill in the other metric's increments when they are of this block's series, in its order."""
        if self.is_bytes is None or self.is_bytes == is_bytes or list(map(_KEY, billed)) != self.keys:
            return False
        self.fill(billed, is_bytes)
        self.is_bytes = None
        return True

    def fill(self, billed: list[Billed], is_bytes: bool) -> None:
        incs = list(map(_INC, billed))
        if is_bytes:  # 0.0 + inc, as a row's sum from 0.0 is
            self.byte_counts = list(map(float, incs))
            self.costs = list(map(mul, incs, map(_usd_per_byte, map(_TEMPLATE, billed))))
        else:
            self.packet_counts = list(map(float, incs))

    def append(self, template: FlowTemplate, key: bytes, since: int, t: int) -> int:
        """A record with nothing counted yet (a block that grows is made empty: its columns are its own)."""
        self.templates.append(template)
        self.keys.append(key)
        self.starts.append(since)
        self.ends.append(t)
        self.byte_counts.append(0.0)
        self.packet_counts.append(0.0)
        self.costs.append(0.0)
        return len(self.templates) - 1


class FlowRecords:
    """The flow-log records of one request: one per billed flow, its bytes and packets increments paired
    by resource and series key, in the order each flow was first seen. Kept in columns and rendered in
    bulk (every record's numbers formatted and packed by mapped C calls, the pieces joined once): a
    record per billed flow and interval is the enricher's default configuration.

    A resource's first billed series (its bytes Sum, say) make a block; its other metric's, when they
    are the same distinct series in the same order (agents send both Sums that way), fill the block's
    other column by position. Anything else pairs series by key, record by record, new ones appended."""

    __slots__ = ("_blocks", "_by_key", "_first", "_json_lines", "_otlp_logs", "_tail")

    def __init__(self, otlp_logs: OtlpLogs | None = None, json_lines: JsonLines | None = None) -> None:
        """`otlp_logs`, `json_lines`: the C writers of `otlp_request` and `json_lines` (None: the Python
        code here)."""
        self._otlp_logs = otlp_logs
        self._json_lines = json_lines
        self._blocks: list[_Block] = []  # in the order their records were first seen
        self._first: dict[bytes, _Block] = {}  # resource -> the block of its first billed series
        self._by_key: dict[bytes, dict[bytes, tuple[_Block, int]]] = {}  # resource -> key -> its record
        self._tail: _Block | None = None  # the last block, when records are appended to it one by one

    def __len__(self) -> int:
        return sum(len(block.keys) for block in self._blocks)

    def add(self, resource: bytes, billed: list[Billed], *, is_bytes: bool, distinct: bool = False) -> None:
        """Pair the increments of one metric's billed series (`distinct`: no key twice); a flow's record
        spans the interval of its first increment in the request (the rule's: from the run's previous
        point, or its start)."""
        if resource not in self._by_key:
            first = self._first.get(resource)
            if first is None and distinct:
                self._first[resource] = block = _Block.of(billed, is_bytes)
                self._blocks.append(block)
                self._tail = None
                return
            if first is not None and first.pair(billed, is_bytes):
                return
        self._add_by_key(resource, billed, is_bytes)

    def _add_by_key(self, resource: bytes, billed: list[Billed], is_bytes: bool) -> None:
        by_key = self._by_key.get(resource)
        if by_key is None:  # the resource's block so far, by key
            first = self._first.get(resource)
            by_key = self._by_key[resource] = {}
            if first is not None:
                first.is_bytes = None
                by_key.update((key, (first, i)) for i, key in enumerate(first.keys))
        for template, key, inc, since, t in billed:
            at = by_key.get(key)
            if at is None:
                tail = self._tail
                if tail is None:
                    tail = self._tail = _Block()
                    self._blocks.append(tail)
                at = by_key[key] = (tail, tail.append(template, key, since, t))
            block, i = at
            if is_bytes:
                block.byte_counts[i] += inc
                block.costs[i] += inc * template.usd_per_byte
            else:
                block.packet_counts[i] += inc

    def _columns(self) -> tuple[list[Any], ...]:
        """templates, starts, ends, bytes, packets and costs of every record."""
        blocks = self._blocks
        if len(blocks) == 1:
            b = blocks[0]
            return b.templates, b.starts, b.ends, b.byte_counts, b.packet_counts, b.costs
        return tuple(
            list(chain.from_iterable(map(attrgetter(name), blocks)))
            for name in ("templates", "starts", "ends", "byte_counts", "packet_counts", "costs")
        )

    def json_lines(self) -> bytes:
        """Every record as a JSON line: the template's prefix, then the numbers. The floats (times, cost)
        of all records are written by one orjson call (shortest round-trip form, as repr, several times
        faster than formatting each). For the C writer, an interval every record shares (an agent's
        request: one export time, one previous one) is written once and copied into each line."""
        templates, starts, ends, byte_counts, packet_counts, costs = self._columns()
        n = len(templates)
        if not n:
            return b""
        if self._json_lines is not None:  # the same bytes, written in one buffer (None: a value it declines)
            start, end = starts[0], ends[0]
            if starts.count(start) == n and ends.count(end) == n:
                tokens = orjson.dumps([_seconds(start), _seconds(end), *costs])
                written = self._json_lines(_JSON_GLUE, templates, tokens, byte_counts, packet_counts, True)
                if written is not None:
                    return written
        tokens = orjson.dumps([*map(_seconds, starts), *map(_seconds, ends), *costs])
        if self._json_lines is not None:
            written = self._json_lines(_JSON_GLUE, templates, tokens, byte_counts, packet_counts)
            if written is not None:
                return written
        floats = tokens[1:-1].split(b",")
        numbers = zip(
            floats[:n],
            floats[n : 2 * n],
            map(int, byte_counts),
            map(int, packet_counts),
            floats[2 * n :],
            strict=True,
        )
        lines = zip(map(_json_prefix, templates), map(_JSON_NUMBERS.__mod__, numbers), strict=True)
        return b"".join(chain.from_iterable(lines))

    def otlp_request(self) -> bytes:
        """Every record as a LogRecord of one serialised OTLP logs request (resource
        service.name=otel-kzt-enricher), joined once: the enclosing headers are computed from the pieces'
        lengths (each copy of a large buffer costs more than all the records' rendering on a VM)."""
        templates, starts, ends, byte_counts, packet_counts, costs = self._columns()
        if self._otlp_logs is not None:  # the same bytes, written in one buffer (None: a value it declines)
            written = self._otlp_logs(
                _RESOURCE_FIELD, _SCOPE_FIELD, _BYTES_HEADS, _PACKETS_HEADS, _COST_HEAD, _START_HEAD,
                templates, starts, ends, byte_counts, packet_counts, costs,
            )  # fmt: skip
            if written is not None:
                return written
        counts = list(map(add, _BYTES_ATTR.int_values(byte_counts), _PACKETS_ATTR.int_values(packet_counts)))
        sizes = map(add, map(_otlp_fixed, templates), map(len, counts))
        numbers = map(
            _NUMBERS_PACK,
            repeat(_TIME_TAG),
            ends,
            repeat(_OBSERVED_TAG),
            ends,
            repeat(_COST_HEAD),
            costs,
            repeat(_START_HEAD),
            map(_seconds, starts),
        )
        # each: ScopeLogs.log_records tag + length, the static part, times and doubles, the two counts
        # (concatenation = protobuf merge)
        records = zip(
            _record_heads(sizes),
            map(_otlp_static, templates),
            numbers,
            counts,
            strict=True,
        )
        pieces: list[bytes] = [b"", _RESOURCE_FIELD, b"", _SCOPE_FIELD, *chain.from_iterable(records)]
        scope_logs = sum(map(len, pieces))
        pieces[2] = bytes((_SCOPE_LOGS_TAG,)) + varint(scope_logs - len(_RESOURCE_FIELD))
        pieces[0] = bytes((_RESOURCE_LOGS_TAG,)) + varint(scope_logs + len(pieces[2]))
        return b"".join(pieces)


def _int_heads(encoder: AttributeEncoder) -> tuple[bytes, ...]:
    """What precedes a k-byte varint in `encoder.int_value`, by k (0: unused), for the C writer."""
    return (b"", *(encoder.int_value(1 << 7 * (k - 1))[:-k] for k in range(1, 11)))


# processing/_native_flowlogs.c `otlp_logs`: (resource, scope, the two heads by varint length, the cost
# and start heads, then the columns) -> the request, or None for values it leaves to the Python code
OtlpLogs = Callable[..., bytes | None]
DEFAULT_OTLP_LOGS: Final[OtlpLogs | None] = None if native.MODULE is None else native.MODULE.otlp_logs
# ... `json_lines`: (the glue around a line's numbers, templates, orjson's floats, bytes, packets[, shared:
# the floats are one start, one end, then the costs: every record spans that interval])
JsonLines = Callable[..., bytes | None]
DEFAULT_JSON_LINES: Final[JsonLines | None] = None if native.MODULE is None else native.MODULE.json_lines
_BYTES_HEADS: Final = _int_heads(_BYTES_ATTR)
_PACKETS_HEADS: Final = _int_heads(_PACKETS_ATTR)
_SHORT_RECORD: Final = 0x4000  # records shorter than this (two-byte lengths) take their head from a table


@functools.cache
def _record_heads_table() -> tuple[bytes, ...]:
    """Made on first use (16k small bytes) and whole before anyone sees it: the receiver's workers reach
    the first use together, and a list filled in place was read half made (IndexError: the request
    answered UNKNOWN, its points not forwarded). Threads arriving together may each make one."""
    return tuple(bytes((_LOG_RECORDS_TAG,)) + varint(n) for n in range(_SHORT_RECORD))


def _record_heads(sizes: Iterable[int]) -> list[bytes]:
    """ScopeLogs.log_records tag + length, for records of these sizes."""
    table = _record_heads_table()
    long = bytes((_LOG_RECORDS_TAG,))
    return [table[n] if n < _SHORT_RECORD else long + varint(n) for n in sizes]


class FlowLogWriter:
    """JSON lines on a text stream (its byte buffer when it has one: the lines are UTF-8 already), one
    write per request; one lock so concurrent requests never interleave a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._buffer: BinaryIO | None = getattr(stream, "buffer", None)
        self._lock = threading.Lock()

    def write(self, records: FlowRecords) -> None:
        lines = records.json_lines()
        if not lines:
            return
        with self._lock:
            if self._buffer is None:
                self._stream.write(lines.decode())
            else:
                self._stream.flush()  # whatever went through the text layer first
                self._buffer.write(lines)
                self._buffer.flush()
            self._stream.flush()


def _static_envelope() -> tuple[bytes, bytes]:
    """ResourceLogs.resource and ScopeLogs.scope of every flow-log request, encoded once."""
    resource_logs = ExportLogsServiceRequest().resource_logs.add()
    for key, value in (
        (schema.SERVICE_NAME, schema.ENRICHER_SERVICE_NAME),
        (schema.SERVICE_VERSION, __version__),
    ):
        resource_logs.resource.attributes.add(key=key, value=AnyValue(string_value=value))
    scope_logs = resource_logs.scope_logs.add()
    scope_logs.scope.name = "otel_kzt.enricher"
    return (
        length_delimited(_RESOURCE_TAG, resource_logs.resource.SerializeToString()),
        length_delimited(_SCOPE_TAG, scope_logs.scope.SerializeToString()),
    )


_RESOURCE_FIELD, _SCOPE_FIELD = _static_envelope()
