"""Prometheus exposition of Services and savings (DESIGN §4).

Counters (`kzt_service_traffic_bytes_total`, and the billed client->server flows the savings are computed
from: `kzt_savings_flow_bytes_total`, `kzt_savings_flow_cost_usd_total`) come from the aggregates snapshot
`/metrics` is built from, like every other counter. Gauges come from the savings tracker's last step:
`kzt_service_endpoints`, `kzt_service_routing_info`, `kzt_service_routing_change_timestamp_seconds`,
`kzt_savings_usd_per_month`, `kzt_savings_enabled` and `kzt_savings_info`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from otel_kzt import schema
from otel_kzt.k8s.servicemodel import ServiceView
from otel_kzt.savings.model import Report, ServiceKey

# Families of the aggregates snapshot (exporters/prometheus.Aggregates) these counters are read from.
SERVICE_BYTES: Final = "service_bytes"
SAVINGS_BYTES: Final = "savings_bytes"
SAVINGS_USD: Final = "savings_usd"
Family = Mapping[tuple[str, ...], float]


def _counter(name: str, doc: str, labels: tuple[str, ...], totals: Family) -> Metric:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(totals.items()):
        family.add_metric(list(key), value)
    return family


def counters(snap: Mapping[str, Family]) -> Iterator[Metric]:
    """The Service and savings counters of one aggregates snapshot."""
    yield _counter(
        schema.PROM_SERVICE_TRAFFIC_BYTES,
        "IP bytes to (requests) and from (responses) each Service's endpoints, by peer workload and class",
        schema.PROM_SERVICE_TRAFFIC_LABELS,
        snap.get(SERVICE_BYTES, {}),
    )
    yield _counter(
        schema.PROM_SAVINGS_FLOW_BYTES,
        "Billed (cross-zone, cross-region) IP bytes between a client and a server workload, by zones",
        schema.PROM_SAVINGS_FLOW_LABELS,
        snap.get(SAVINGS_BYTES, {}),
    )
    yield _counter(
        schema.PROM_SAVINGS_FLOW_COST,
        "Estimated cost in US dollars of the billed bytes of kzt_savings_flow_bytes_total",
        schema.PROM_SAVINGS_FLOW_LABELS,
        snap.get(SAVINGS_USD, {}),
    )


def combined(snap: Mapping[str, Family]) -> dict[tuple[str, ...], tuple[float, float]]:
    """Billed-flow totals as the savings engine takes them: key -> (bytes, usd)."""
    usd = snap.get(SAVINGS_USD, {})
    return {k: (b, usd.get(k, 0.0)) for k, b in snap.get(SAVINGS_BYTES, {}).items()}


class SavingsSource(Protocol):
    """What the gauges read (state.savings.SavingsTracker)."""

    @property
    def report(self) -> Report: ...

    def views(self) -> tuple[ServiceView, ...]: ...

    def change_times(self) -> Mapping[ServiceKey, float]: ...


class SavingsCollector(Collector):
    """The savings gauges, from the tracker's last step."""

    def __init__(self, tracker: SavingsSource) -> None:
        self._tracker = tracker

    def collect(self) -> Iterator[Metric]:
        report, views, changes = self._tracker.report, self._tracker.views(), self._tracker.change_times()
        enabled = GaugeMetricFamily(
            schema.PROM_SAVINGS_ENABLED,
            "1 while Services and EndpointSlices are readable and savings computed",
        )
        enabled.add_metric([], 1.0 if report.enabled else 0.0)
        yield enabled
        info = GaugeMetricFamily(
            schema.PROM_SAVINGS_INFO,
            "The cluster's version and the routing setting it "
            "accepts, which the recommendations name (value 1)",
            labels=list(schema.PROM_SAVINGS_INFO_LABELS),
        )
        if report.enabled:
            info.add_metric([report.kubernetes_version, report.setting], 1.0)
        yield info
        endpoints = GaugeMetricFamily(
            schema.PROM_SERVICE_ENDPOINTS,
            "Ready endpoints of each Service per zone",
            labels=list(schema.PROM_SERVICE_ENDPOINTS_LABELS),
        )
        routing = GaugeMetricFamily(
            schema.PROM_SERVICE_ROUTING_INFO,
            "How each Service is routed across zones (value 1)",
            labels=list(schema.PROM_SERVICE_ROUTING_INFO_LABELS),
        )
        for view in views:
            ns, name = view.ref.namespace, view.ref.name
            for zone, n in sorted(view.endpoints_by_zone("ready").items(), key=lambda i: i[0] or ""):
                endpoints.add_metric([ns, name, zone or ""], float(n))
            routing.add_metric([ns, name, view.routing], 1.0)
        yield endpoints
        yield routing
        changed = GaugeMetricFamily(
            schema.PROM_SERVICE_ROUTING_CHANGE,
            "Unix time a Service's routing or its ready endpoints' zones last changed",
            labels=list(schema.PROM_SERVICE_LABELS),
        )
        for (ns, name), at in sorted(changes.items()):
            changed.add_metric([ns, name], at)
        yield changed
        usd = GaugeMetricFamily(
            schema.PROM_SAVINGS_USD_PER_MONTH,
            "What each recommendation would save at the rate of the savings window (USD/month)",
            labels=list(schema.PROM_SAVINGS_LABELS),
        )
        for rec in report.recommendations:
            usd.add_metric([rec.namespace, rec.service, rec.workload, rec.kind.value], rec.usd_per_month)
        yield usd
