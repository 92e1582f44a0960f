"""Flow logs: one record per billed flow (cross-zone, cross-region, external) and reporting interval.

Written as JSON lines (stdout by default) and as OTLP log records for the export endpoints. Bytes and packets
of a flow arrive as two metrics; the core pairs them into one `FlowRecord`. Everything constant about a flow
(its attributes, the JSON prefix, the static part of the OTLP record) is rendered once per series in a
`FlowTemplate`; per interval only the numbers are appended: one struct call for the times and the two
doubles, two varints for the counts, and every record of a request joined once (speed: a record per billed
flow and interval, in the enricher's default configuration).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from typing import BinaryIO, Final, TextIO

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO, LogRecord

from otel_kzt import __version__, schema
from otel_kzt.enricher.processing.protowire import (
    AttributeEncoder,
    length_delimited,
    string_attributes,
    varint,
)
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.schema import TrafficClass

_RESOURCE_LOGS_TAG: Final = 0x0A  # ExportLogsServiceRequest.resource_logs (field 1)
_RESOURCE_TAG: Final = 0x0A  # ResourceLogs.resource (field 1)
_SCOPE_LOGS_TAG: Final = 0x12  # ResourceLogs.scope_logs (field 2)
_SCOPE_TAG: Final = 0x0A  # ScopeLogs.scope (field 1)
_LOG_RECORDS_TAG: Final = 0x12  # ScopeLogs.log_records (field 2, length-delimited)
_ATTRIBUTES_TAG: Final = 0x32  # LogRecord.attributes (field 6)
_TIME_TAG: Final = 0x09  # LogRecord.time_unix_nano (field 1, fixed64)
_OBSERVED_TAG: Final = 0x59  # LogRecord.observed_time_unix_nano (field 11, fixed64)
_BYTES_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_BYTES)
_PACKETS_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_PACKETS)
_COST_HEAD: Final = AttributeEncoder(schema.FLOW_LOG_COST).double_head
_START_HEAD: Final = AttributeEncoder(schema.FLOW_LOG_INTERVAL_START).double_head  # Unix seconds (double)
# time, observed time, then the cost and interval-start attributes (each head ends with the double's tag)
_NUMBERS: Final = struct.Struct(f"<BQBQ{len(_COST_HEAD)}sd{len(_START_HEAD)}sd")
_NUMBERS_PACK: Final = _NUMBERS.pack
_JSON_NUMBERS: Final = (  # %a: a float's repr, which JSON reads back exactly
    f',"{schema.FLOW_LOG_INTERVAL_START}":%a,"{schema.FLOW_LOG_INTERVAL_END}":%a,'
    f'"{schema.FLOW_LOG_BYTES}":%d,"{schema.FLOW_LOG_PACKETS}":%d,"{schema.FLOW_LOG_COST}":%a}}\n'
).encode()


class FlowTemplate:
    """The constant part of one flow's records, rendered once per series and metadata generation."""

    __slots__ = ("json_prefix", "otlp_fixed", "otlp_static", "traffic_class", "usd_per_byte")

    def __init__(self, resolved: Resolved, usd_per_byte: float, *, json_lines: bool, otlp: bool) -> None:
        """Render only the forms that are written (each is about a kilobyte per billed series)."""
        self.traffic_class: TrafficClass = resolved.traffic_class
        self.usd_per_byte = usd_per_byte
        attrs = sorted(resolved.attrs.items())
        self.json_prefix = b""  # the line up to its numbers, UTF-8 (written to the byte stream as it is)
        if json_lines:
            self.json_prefix = orjson.dumps({"event": schema.FLOW_LOG_EVENT_NAME, **dict(attrs)})[:-1]
        self.otlp_static = b""
        if otlp:
            head = LogRecord(
                severity_number=SEVERITY_NUMBER_INFO,
                severity_text="INFO",
                event_name=schema.FLOW_LOG_EVENT_NAME,
                body=AnyValue(
                    string_value=f"{resolved.traffic_class.value} flow "
                    f"{resolved.attrs.get(schema.SOURCE_ADDRESS, '?')} -> "
                    f"{resolved.attrs.get(schema.DESTINATION_ADDRESS, '?')}"
                ),
            )
            self.otlp_static = head.SerializeToString() + string_attributes(attrs, _ATTRIBUTES_TAG)
        self.otlp_fixed = len(self.otlp_static) + _NUMBERS.size  # a record's length, but for its counts


class FlowRecord:
    """One billed flow's numbers over one interval (bytes and packets paired by the core)."""

    __slots__ = ("byte_count", "cost_usd", "end_ns", "packet_count", "start_ns", "template")

    def __init__(
        self,
        template: FlowTemplate,
        start_ns: int,
        end_ns: int,
        *,
        byte_count: float = 0.0,
        packet_count: float = 0.0,
        cost_usd: float = 0.0,
    ) -> None:
        self.template = template
        self.start_ns = start_ns  # interval start (previous report of the series, or its start time)
        self.end_ns = end_ns
        self.byte_count, self.packet_count, self.cost_usd = byte_count, packet_count, cost_usd

    def json_line(self) -> str:
        pieces: list[bytes] = []
        self.json_pieces(pieces)
        return b"".join(pieces).decode()

    def json_pieces(self, out: list[bytes]) -> None:
        """The JSON line appended to `out`: the template's prefix, then the numbers (floats as repr)."""
        numbers = (self.start_ns / 1e9, self.end_ns / 1e9, int(self.byte_count), int(self.packet_count))
        out += (self.template.json_prefix, _JSON_NUMBERS % (*numbers, self.cost_usd))

    def otlp_pieces(self, out: list[bytes]) -> None:
        """The length-delimited LogRecord (ScopeLogs.log_records) appended to `out` as pieces: the static
        part, the times and doubles, the two counts (concatenation = protobuf merge)."""
        template = self.template
        counts = _BYTES_ATTR.int_value(int(self.byte_count)) + _PACKETS_ATTR.int_value(int(self.packet_count))
        end = self.end_ns
        out += (
            _LOG_RECORD_HEADS[template.otlp_fixed + len(counts)],
            template.otlp_static,
            _NUMBERS_PACK(
                _TIME_TAG,
                end,
                _OBSERVED_TAG,
                end,
                _COST_HEAD,
                self.cost_usd,
                _START_HEAD,
                self.start_ns / 1e9,
            ),
            counts,
        )

    def otlp_bytes(self) -> bytes:
        """The serialised LogRecord (without its length-delimited wrapper)."""
        pieces: list[bytes] = []
        self.otlp_pieces(pieces)
        return b"".join(pieces[1:])


class _Heads(dict[int, bytes]):
    """ScopeLogs.log_records tag + length, by length (few distinct lengths: made once each)."""

    def __missing__(self, size: int) -> bytes:
        head = self[size] = bytes((_LOG_RECORDS_TAG,)) + varint(size)
        return head


_LOG_RECORD_HEADS: Final = _Heads()


class FlowLogWriter:
    """JSON lines on a text stream (its byte buffer when it has one: the lines are UTF-8 already), one
    write per request; one lock so concurrent requests never interleave a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._buffer: BinaryIO | None = getattr(stream, "buffer", None)
        self._lock = threading.Lock()

    def write(self, records: Iterable[FlowRecord]) -> None:
        pieces: list[bytes] = []
        for record in records:
            record.json_pieces(pieces)
        if not pieces:
            return
        lines = b"".join(pieces)
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


def to_otlp_bytes(records: Iterable[FlowRecord]) -> bytes:
    """The records as one serialised OTLP logs request (resource service.name=otel-kzt-enricher), joined
    once: the enclosing headers are computed from the pieces' lengths (each copy of a large buffer costs
    more than all the records' rendering on a VM)."""
    pieces: list[bytes] = [b"", _RESOURCE_FIELD, b"", _SCOPE_FIELD]
    for record in records:
        record.otlp_pieces(pieces)
    scope_logs = sum(map(len, pieces))
    pieces[2] = bytes((_SCOPE_LOGS_TAG,)) + varint(scope_logs - len(_RESOURCE_FIELD))
    pieces[0] = bytes((_RESOURCE_LOGS_TAG,)) + varint(scope_logs + len(pieces[2]))
    return b"".join(pieces)
