"""Flow logs: one record per billed flow (cross-zone, cross-region, external) and reporting interval.

Written as JSON lines (stdout by default) and turned into OTLP log records for the export endpoints.
Bytes and packets of a flow arrive as two metrics; the core pairs them into one `FlowRecord`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO

from otel_kzt import __version__, schema
from otel_kzt.schema import TrafficClass


@dataclass(slots=True)
class FlowRecord:
    attrs: Mapping[str, str]  # the enriched data-point attributes: both ends, ports, class
    traffic_class: TrafficClass
    start_ns: int  # interval start (previous report of the series, or its start time)
    end_ns: int
    bytes: float = 0.0
    packets: float = 0.0
    cost_usd: float = 0.0

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": schema.FLOW_LOG_EVENT_NAME}
        out.update(sorted(self.attrs.items()))
        out[schema.FLOW_LOG_INTERVAL_START] = self.start_ns / 1e9
        out[schema.FLOW_LOG_INTERVAL_END] = self.end_ns / 1e9
        out[schema.FLOW_LOG_BYTES] = _number(self.bytes)
        out[schema.FLOW_LOG_PACKETS] = _number(self.packets)
        out[schema.FLOW_LOG_COST] = self.cost_usd
        return out


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


class FlowLogWriter:
    """JSON lines on a text stream; one lock so concurrent requests never interleave a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, records: Iterable[FlowRecord]) -> None:
        lines = "".join(json.dumps(r.as_json(), separators=(",", ":")) + "\n" for r in records)
        if not lines:
            return
        with self._lock:
            self._stream.write(lines)
            self._stream.flush()


def to_otlp(records: Iterable[FlowRecord]) -> ExportLogsServiceRequest:
    """The same records as OTLP log records (event name kzt.flow, attributes = the JSON fields)."""
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    for key, value in (
        (schema.SERVICE_NAME, schema.ENRICHER_SERVICE_NAME),
        (schema.SERVICE_VERSION, __version__),
    ):
        resource_logs.resource.attributes.add(key=key, value=AnyValue(string_value=value))
    scope_logs = resource_logs.scope_logs.add()
    scope_logs.scope.name = "otel_kzt.enricher"
    for record in records:
        log = scope_logs.log_records.add()
        log.time_unix_nano = record.end_ns
        log.observed_time_unix_nano = record.end_ns
        log.severity_number = SEVERITY_NUMBER_INFO
        log.severity_text = "INFO"
        log.event_name = schema.FLOW_LOG_EVENT_NAME
        log.body.string_value = (
            f"{record.traffic_class.value} flow {record.attrs.get(schema.SOURCE_ADDRESS, '?')} -> "
            f"{record.attrs.get(schema.DESTINATION_ADDRESS, '?')}: {int(record.bytes)} bytes"
        )
        log.attributes.extend(
            KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in sorted(record.attrs.items())
        )
        log.attributes.extend(
            [
                KeyValue(key=schema.FLOW_LOG_BYTES, value=AnyValue(int_value=int(record.bytes))),
                KeyValue(key=schema.FLOW_LOG_PACKETS, value=AnyValue(int_value=int(record.packets))),
                KeyValue(key=schema.FLOW_LOG_COST, value=AnyValue(double_value=record.cost_usd)),
                KeyValue(key=schema.FLOW_LOG_INTERVAL_START, value=AnyValue(int_value=record.start_ns)),
            ]
        )
    return request
