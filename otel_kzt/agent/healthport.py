"""The agent's health endpoint (`--health-endpoint`, default 0.0.0.0:9465): /healthz, /readyz, /metrics.

Served by the same aiohttp page port as the enricher's metrics port (`otel_kzt.serving`), on its own
thread: the pages read only what `Health` holds, so they answer while the interval loop is stuck.
/metrics is the agent's own metrics in Prometheus text from an explicit registry, under the names the
enricher gives the agents' health (DESIGN §4), without the node label: a scrape of one agent is one node.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from otel_kzt import schema
from otel_kzt.agent.health import AgentReport, Health, device_changes
from otel_kzt.serving.limits import HttpLimits
from otel_kzt.serving.pages import MetricsPort, Page, PageRequest, Reply

# A probe or a scraper, not the world: a few connections, quick heads.
LIMITS = HttpLimits(max_connections=64, header_timeout_s=10.0, body_timeout_s=10.0, lingering_s=1.0)


def report_metrics(report: AgentReport) -> Iterator[Metric]:
    """The agent-health families of one report (labels added by the caller's families: none here)."""
    yield _gauge(schema.AGENT_FLOWS_TRACKED, "flows in the kernel flow maps", report.flows_tracked)
    yield _gauge(
        schema.AGENT_MAP_FILL_RATIO, "flows / capacity of the fuller flow map", report.map_fill_ratio
    )
    yield _counter(
        schema.AGENT_OVERFLOW_BYTES, "bytes of flows that did not fit in the map", report.overflow_bytes
    )
    yield _counter(
        schema.AGENT_OVERFLOW_PACKETS, "packets of flows that did not fit in the map", report.overflow_packets
    )
    exports = CounterMetricFamily(
        schema.AGENT_EXPORTS, "export requests by result", labels=[schema.AGENT_RESULT]
    )
    exports.add_metric(["ok"], report.exports_ok)
    exports.add_metric(["failed"], report.exports_failed)
    yield exports
    yield _gauge(
        schema.AGENT_METADATA_SYNCED, "1 once Kubernetes metadata has synced", int(report.metadata_synced)
    )
    info = GaugeMetricFamily(
        schema.AGENT_DATAPATH_INFO,
        "the datapath mode counting (value 1)",
        labels=[schema.AGENT_DATAPATH_LABEL],
    )
    info.add_metric([report.datapath], 1)
    yield info
    if report.coverage_ratio is not None:
        yield _gauge(
            schema.AGENT_DATAPATH_COVERAGE, "bytes counted / bytes on pod interfaces", report.coverage_ratio
        )
    if report.service_vip_bytes is not None:
        yield _counter(schema.AGENT_SERVICE_VIP_BYTES, "bytes sent to Service VIPs", report.service_vip_bytes)
    if report.devices is not None:
        yield _gauge(schema.AGENT_DATAPATH_DEVICES, "network devices hooked", report.devices.hooked)
        changes = CounterMetricFamily(
            schema.AGENT_DATAPATH_DEVICE_CHANGES,
            "devices hooked or unhooked while running, or counted at the uplinks instead (covered)",
            labels=[schema.AGENT_DEVICE_CHANGE_LABEL],
        )
        for change, count in device_changes(report.devices):
            changes.add_metric([change], count)
        yield changes


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class _ReportCollector(Collector):
    """Exposes the last published report (nothing before the loop's first pass)."""

    def __init__(self, health: Health) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        report = self._health.report
        if report is not None:
            yield from report_metrics(report)


def pages(health: Health, registry: CollectorRegistry) -> dict[str, Page]:
    def healthz(_request: PageRequest) -> Reply:
        ok, why = health.alive()
        return Reply(200 if ok else 503, f"{'ok' if ok else 'not alive'}: {why}\n".encode())

    def readyz(_request: PageRequest) -> Reply:
        ok, failing = health.ready()
        if ok:
            return Reply(200, b"ready\n")
        return Reply(503, ("not ready\n" + "".join(f"{line}\n" for line in failing)).encode())

    def metrics(request: PageRequest) -> Reply:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Reply(200, encoder(registry), content_type)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


class HealthPort:
    """Start/stop of the endpoint; `start()` binds (an address in use fails it) and returns the port."""

    def __init__(self, host: str, port: int, health: Health) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ReportCollector(health))
        self._port = MetricsPort(host, port, pages(health, self.registry), LIMITS)

    def start(self) -> int:
        return self._port.start()

    def shutdown(self) -> None:
        self._port.shutdown()
