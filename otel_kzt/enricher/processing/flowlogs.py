"""Flow logs: one record per billed flow (cross-zone, cross-region, external) and reporting interval.

Written as JSON lines (stdout by default) and as OTLP log records for the export endpoints. Bytes and packets
of a flow arrive as two metrics; the core pairs them into one `FlowRecord`. Everything constant about a flow
(its attributes, the JSON prefix, the static part of the OTLP record) is rendered once per series in a
`FlowTemplate`; per interval only the numbers are appended.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TextIO

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO, LogRecord

from otel_kzt import __version__, schema
from otel_kzt.enricher.processing.protowire import AttributeEncoder, length_delimited
from otel_kzt.enricher.processing.resolution import Resolved
from otel_kzt.schema import TrafficClass

_RESOURCE_LOGS_TAG: Final = 0x0A  # ExportLogsServiceRequest.resource_logs (field 1)
_RESOURCE_TAG: Final = 0x0A  # ResourceLogs.resource (field 1)
_SCOPE_LOGS_TAG: Final = 0x12  # ResourceLogs.scope_logs (field 2)
_SCOPE_TAG: Final = 0x0A  # ScopeLogs.scope (field 1)
_LOG_RECORDS_TAG: Final = 0x12  # ScopeLogs.log_records (field 2, length-delimited)
_TIME_TAG: Final = 0x09  # LogRecord.time_unix_nano (field 1, fixed64)
_OBSERVED_TAG: Final = 0x59  # LogRecord.observed_time_unix_nano (field 11, fixed64)
_TIMES: Final = struct.Struct("<BQBQ")
_BYTES_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_BYTES)
_PACKETS_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_PACKETS)
_COST_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_COST)
_START_ATTR: Final = AttributeEncoder(schema.FLOW_LOG_INTERVAL_START)  # Unix seconds (double)


class FlowTemplate:
    """The constant part of one flow's records, rendered once per series and metadata generation."""

    __slots__ = ("json_prefix", "otlp_static", "traffic_class", "usd_per_byte")

    def __init__(self, resolved: Resolved, usd_per_byte: float, *, json_lines: bool, otlp: bool) -> None:
        """Render only the forms that are written (each is about a kilobyte per billed series)."""
        self.traffic_class: TrafficClass = resolved.traffic_class
        self.usd_per_byte = usd_per_byte
        attrs = sorted(resolved.attrs.items())
        self.json_prefix = ""
        if json_lines:
            self.json_prefix = json.dumps(
                {"event": schema.FLOW_LOG_EVENT_NAME, **dict(attrs)}, separators=(",", ":")
            )[:-1]
        self.otlp_static = b""
        if otlp:
            record = LogRecord(
                severity_number=SEVERITY_NUMBER_INFO,
                severity_text="INFO",
                event_name=schema.FLOW_LOG_EVENT_NAME,
                body=AnyValue(
                    string_value=f"{resolved.traffic_class.value} flow "
                    f"{resolved.attrs.get(schema.SOURCE_ADDRESS, '?')} -> "
                    f"{resolved.attrs.get(schema.DESTINATION_ADDRESS, '?')}"
                ),
                attributes=[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attrs],
            )
            self.otlp_static = record.SerializeToString()


@dataclass(slots=True)
class FlowRecord:
    template: FlowTemplate
    start_ns: int  # interval start (previous report of the series, or its start time)
    end_ns: int
    byte_count: float = 0.0
    packet_count: float = 0.0
    cost_usd: float = 0.0

    def json_line(self) -> str:
        return (
            f'{self.template.json_prefix},"{schema.FLOW_LOG_INTERVAL_START}":{self.start_ns / 1e9!r},'
            f'"{schema.FLOW_LOG_INTERVAL_END}":{self.end_ns / 1e9!r},'
            f'"{schema.FLOW_LOG_BYTES}":{int(self.byte_count)},"{schema.FLOW_LOG_PACKETS}":{int(self.packet_count)},'
            f'"{schema.FLOW_LOG_COST}":{self.cost_usd!r}}}\n'
        )

    def otlp_bytes(self) -> bytes:
        """The serialised LogRecord: static part + times + the numbers (concatenation = protobuf merge)."""
        return b"".join(
            (
                self.template.otlp_static,
                _TIMES.pack(_TIME_TAG, self.end_ns, _OBSERVED_TAG, self.end_ns),
                _BYTES_ATTR.int_value(int(self.byte_count)),
                _PACKETS_ATTR.int_value(int(self.packet_count)),
                _COST_ATTR.double_value(self.cost_usd),
                _START_ATTR.double_value(self.start_ns / 1e9),
            )
        )


class FlowLogWriter:
    """JSON lines on a text stream; one lock so concurrent requests never interleave a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, records: Iterable[FlowRecord]) -> None:
        lines = "".join(r.json_line() for r in records)
        if not lines:
            return
        with self._lock:
            self._stream.write(lines)
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
    """The records as one serialised OTLP logs request (resource service.name=otel-kzt-enricher)."""
    scope_logs = _SCOPE_FIELD + b"".join(length_delimited(_LOG_RECORDS_TAG, r.otlp_bytes()) for r in records)
    resource_logs = _RESOURCE_FIELD + length_delimited(_SCOPE_LOGS_TAG, scope_logs)
    return length_delimited(_RESOURCE_LOGS_TAG, resource_logs)
