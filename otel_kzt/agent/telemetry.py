"""The agent's own health, sent as extra OTLP metrics in its export requests.

A few metrics (flows tracked, map fill, overflow, exports, export duration, metadata sync) do not need the
OpenTelemetry SDK: they are counted here and serialized with the flow metrics, so every OTLP backend, and
the enricher (which passes unknown metrics through), sees them next to the data they describe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from otel_kzt import schema
from otel_kzt.agent.encode import gauge_metric, sum_metric
from otel_kzt.agent.flows import DeviceCounts
from otel_kzt.agent.health import AgentReport, device_changes


@dataclass(frozen=True, slots=True)
class StatsView:
    exports_ok: int
    exports_failed: int
    rejected_points: int
    flows_evicted: int
    last_export_duration_s: float
    finals_pending: int = 0
    finals_dropped: int = 0


class AgentStats:
    """Counters of the export loop; updated from the loop thread, read when a request is built."""

    def __init__(self, started_unix_ns: int) -> None:
        self.started_unix_ns = started_unix_ns
        self._lock = threading.Lock()
        self._ok = self._failed = self._rejected = self._evicted = 0
        self._finals_pending = self._finals_dropped = 0
        self._duration = 0.0

    def record_export(self, ok: int, failed: int, rejected_points: int, duration_s: float) -> None:
        with self._lock:
            self._ok += ok
            self._failed += failed
            self._rejected += rejected_points
            self._duration = duration_s

    def record_evicted(self, count: int) -> None:
        with self._lock:
            self._evicted += count

    def record_finals(self, pending: int, dropped: int) -> None:
        """Final values of evicted flows awaiting delivery now, and newly given up (bounded store full)."""
        with self._lock:
            self._finals_pending = pending
            self._finals_dropped += dropped

    def view(self) -> StatsView:
        with self._lock:
            return StatsView(
                self._ok,
                self._failed,
                self._rejected,
                self._evicted,
                self._duration,
                self._finals_pending,
                self._finals_dropped,
            )


def telemetry_metrics(
    report: AgentReport,
    stats: StatsView,
    started_unix_ns: int,
    time_unix_ns: int,
    *,
    exported: int,
    datapath_started_unix_ns: int = 0,
) -> list[bytes]:
    """ScopeMetrics.metrics entries for the agent's health at the snapshot's time: the numbers of its own
    /metrics (`report`, the same values) plus the loop's details (`stats`)."""
    start = started_unix_ns
    overflow_start = datapath_started_unix_ns or started_unix_ns
    metrics = [
        gauge_metric(
            schema.OTLP_AGENT_FLOWS_TRACKED,
            "flows in the kernel flow maps",
            "{flow}",
            [((), float(report.flows_tracked))],
            time_unix_ns,
        ),
        gauge_metric(
            schema.OTLP_AGENT_FLOWS_EXPORTED,
            "local flows in this export",
            "{flow}",
            [((), float(exported))],
            time_unix_ns,
        ),
        gauge_metric(
            schema.OTLP_AGENT_MAP_FILL_RATIO,
            "flows / capacity of the fuller flow map (IPv4, IPv6)",
            "1",
            [((), report.map_fill_ratio)],
            time_unix_ns,
        ),
        # The overflow counters live in pinned maps that outlive the process: their start is the
        # datapath's (pinned), so a restarted agent continues the same run and nothing counts twice.
        sum_metric(
            schema.OTLP_AGENT_OVERFLOW_BYTES,
            "bytes of flows that did not fit in the map",
            "By",
            [((), overflow_start, report.overflow_bytes)],
            time_unix_ns,
        ),
        sum_metric(
            schema.OTLP_AGENT_OVERFLOW_PACKETS,
            "packets of flows that did not fit in the map",
            "{packet}",
            [((), overflow_start, report.overflow_packets)],
            time_unix_ns,
        ),
        sum_metric(
            schema.OTLP_AGENT_FLOWS_EVICTED,
            "idle flows evicted after their final export",
            "{flow}",
            [((), start, stats.flows_evicted)],
            time_unix_ns,
        ),
        gauge_metric(
            schema.OTLP_AGENT_FINALS_PENDING,
            "evicted flows whose final value awaits delivery",
            "{flow}",
            [((), float(stats.finals_pending))],
            time_unix_ns,
        ),
        sum_metric(
            schema.OTLP_AGENT_FINALS_DROPPED,
            "evicted flows whose final value was given up undelivered (retry store full)",
            "{flow}",
            [((), start, stats.finals_dropped)],
            time_unix_ns,
        ),
        sum_metric(
            schema.OTLP_AGENT_EXPORTS,
            "export requests by result",
            "{request}",
            [
                ([(schema.AGENT_RESULT, "ok")], start, report.exports_ok),
                ([(schema.AGENT_RESULT, "failed")], start, report.exports_failed),
            ],
            time_unix_ns,
        ),
        gauge_metric(
            schema.OTLP_AGENT_EXPORT_DURATION,
            "duration of the previous interval's export",
            "s",
            [((), stats.last_export_duration_s)],
            time_unix_ns,
        ),
        gauge_metric(
            schema.OTLP_AGENT_METADATA_SYNCED,
            "1 once Kubernetes metadata has synced",
            "1",
            [((), 1.0 if report.metadata_synced else 0.0)],
            time_unix_ns,
        ),
        gauge_metric(
            schema.OTLP_AGENT_DATAPATH_INFO,
            "the datapath mode counting (value 1)",
            "1",
            [([(schema.AGENT_DATAPATH_LABEL, report.datapath)], 1.0)],
            time_unix_ns,
        ),
    ]
    if report.coverage_ratio is not None:
        metrics.append(
            gauge_metric(
                schema.OTLP_AGENT_DATAPATH_COVERAGE,
                "bytes counted / bytes on pod interfaces",
                "1",
                [((), report.coverage_ratio)],
                time_unix_ns,
            )
        )
    if report.service_vip_bytes is not None:
        metrics.append(
            sum_metric(
                schema.OTLP_AGENT_SERVICE_VIP_BYTES,
                "bytes sent to Service VIPs",
                "By",
                [((), start, report.service_vip_bytes)],
                time_unix_ns,
            )
        )
    if report.devices is not None:
        metrics += _device_metrics(report.devices, start, time_unix_ns)
    return metrics


def _device_metrics(devices: DeviceCounts, start: int, time_unix_ns: int) -> list[bytes]:
    return [
        gauge_metric(
            schema.OTLP_AGENT_DATAPATH_DEVICES,
            "network devices hooked",
            "{device}",
            [((), float(devices.hooked))],
            time_unix_ns,
        ),
        sum_metric(
            schema.OTLP_AGENT_DATAPATH_DEVICE_CHANGES,
            "devices hooked or unhooked while running, or counted at the uplinks instead (covered)",
            "{device}",
            [
                ([(schema.AGENT_DEVICE_CHANGE_LABEL, change)], start, count)
                for change, count in device_changes(devices)
            ],
            time_unix_ns,
        ),
    ]
