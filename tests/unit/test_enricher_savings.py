"""The enricher's savings state and exposition: tracker steps, gauges and counters, the JSON bodies."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from otel_kzt import schema
from otel_kzt.enricher.exporters.savings import SavingsCollector, combined, counters
from otel_kzt.enricher.exporters.summary import summary
from otel_kzt.enricher.exporters.webapi import savings_body, summary_body
from otel_kzt.enricher.state.savings import NOT_LISTED, SavingsTracker
from otel_kzt.k8s.model import SourceFailure, SyncState
from otel_kzt.k8s.servicemodel import (
    ClusterVersion,
    EndpointPort,
    ServiceEndpoint,
    ServicePort,
    ServiceRef,
    ServiceView,
)
from otel_kzt.savings.jsonform import report_from_json
from otel_kzt.savings.model import Direction, Kind, Workload, flow_key

API = ServiceRef("shop", "api")
KEY = flow_key(
    Workload("shop", "Deployment", "web"),
    "a",
    Workload("shop", "Deployment", "api"),
    "b",
    service=("shop", "api"),
    direction=Direction.FROM,
)


def _endpoint(zone: str, address: str, pod: str, ready: bool = True) -> ServiceEndpoint:
    return ServiceEndpoint(
        (address,),
        "IPv4",
        (EndpointPort("http", "TCP", 8080),),
        zone,
        f"n-{zone}",
        "shop",
        pod,
        ready,
        True,
        not ready,
        (),
    )


def _view(distribution: str | None = None) -> ServiceView:
    port = ServicePort("http", "TCP", 80, 8080, None)
    return ServiceView(API, "ClusterIP", ("10.1.200.10",), False, (port,), distribution, None, None,
                       "Cluster", (_endpoint("a", "10.0.0.1", "api-1"), _endpoint("b", "10.0.0.2", "api-2"),
                        _endpoint("c", "10.0.0.3", "api-3", ready=False)), None)  # fmt: skip


class Catalog:
    def __init__(self) -> None:
        self.up = True
        self.views = (_view(),)
        self.generation = 1

    def available(self) -> bool:
        return self.up

    def services(self) -> tuple[ServiceView, ...]:
        return self.views if self.up else ()

    def cluster_version(self) -> ClusterVersion | None:
        return ClusterVersion(1, 33, "v1.33.5")


class Index:
    def __init__(self) -> None:
        self.services = Catalog()
        self.failures: tuple[SourceFailure, ...] = ()

    def sync_state(self) -> SyncState:
        return SyncState(True, self.services.up, (), self.failures)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _tracker(
    index: Index, clock: Clock, totals: dict[tuple[str, ...], tuple[float, float]]
) -> SavingsTracker:
    return SavingsTracker(index, lambda: dict(totals), 60.0, clock=clock)  # type: ignore[arg-type]


def test_tracker_recommends_what_the_cluster_accepts_and_exposes_gauges() -> None:
    index, clock, totals = Index(), Clock(), {KEY: (0.0, 0.0)}
    tracker = _tracker(index, clock, totals)
    assert tracker.interval_s == 1.0  # 60 s window: one snapshot a second
    tracker.step()
    clock.t += 60
    totals[KEY] = (60e6, 60e6 * 2e-11)
    report = tracker.step()
    assert report.enabled and report.setting == "PreferClose"  # 1.33
    (rec,) = report.recommendations
    assert rec.kind is Kind.PREFER_SAME_ZONE and rec.bytes_per_second == pytest.approx(1e6)
    registry = CollectorRegistry()
    registry.register(SavingsCollector(tracker))
    text = generate_latest(registry).decode()
    assert "kzt_savings_enabled 1.0" in text
    # Ready endpoints only (api-3 in c is terminating), per zone.
    assert 'kzt_service_endpoints{service="api",service_namespace="shop",zone="a"} 1.0' in text
    assert 'zone="c"' not in text
    assert (
        'kzt_service_routing_info{service="api",service_namespace="shop",traffic_distribution="none"} 1.0'
        in text
    )
    assert (
        'kzt_savings_usd_per_month{namespace="shop",recommendation="prefer-same-zone",service="api",'
        'workload=""}'
    ) in text
    assert "kzt_service_routing_change_timestamp_seconds{" not in text  # nothing changed yet
    index.services.views = (_view("PreferClose"),)
    clock.t += 1
    tracker.step()
    text = generate_latest(registry).decode()
    assert (
        'kzt_service_routing_change_timestamp_seconds{service="api",service_namespace="shop"} 1061.0' in text
    )


def test_savings_off_while_services_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    index, clock = Index(), Clock()
    index.services.up = False
    tracker = _tracker(index, clock, {})
    with caplog.at_level(logging.WARNING):
        report = tracker.step()
        assert not report.enabled and report.reason == NOT_LISTED
        assert not caplog.records  # not listed yet at start-up: no warning
        index.failures = (
            SourceFailure("services", "list", 403, "Forbidden", "services is forbidden", 1.0, 3, False),
        )
        clock.t += 1
        report = tracker.step()
        tracker.step()
    assert report.reason == "list services: HTTP 403 Forbidden: services is forbidden"
    assert [r.getMessage() for r in caplog.records] == [
        "savings off (the enricher stays ready on pods and nodes): list services: HTTP 403 Forbidden: "
        "services is forbidden"
    ]  # once, not at every step
    registry = CollectorRegistry()
    registry.register(SavingsCollector(tracker))
    text = generate_latest(registry).decode()
    assert "kzt_savings_enabled 0.0" in text and "kzt_service_endpoints{" not in text
    assert json.loads(savings_body(report))["reason"] == report.reason


def test_tracker_thread_starts_and_stops() -> None:
    tracker = _tracker(Index(), Clock(), {})
    tracker.start()
    tracker.start()
    tracker.shutdown()
    tracker.shutdown()
    assert tracker.report.enabled


def test_counters_and_combined_totals() -> None:
    snap = {
        "service_bytes": {("shop", "api", "from", "shop", "Deployment", "web", "cross-zone"): 5.0},
        "savings_bytes": {KEY: 100.0},
        "savings_usd": {KEY: 2e-9},
    }
    registry = CollectorRegistry()

    class _C:
        def collect(self):  # type: ignore[no-untyped-def]
            return counters(snap)

    registry.register(_C())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert (
        'kzt_service_traffic_bytes_total{direction="from",kzt_traffic_class="cross-zone",'
        'peer_k8s_namespace_name="shop",peer_k8s_workload_kind="Deployment",peer_k8s_workload_name="web",'
        'service="api",service_namespace="shop"} 5.0'
    ) in text
    assert 'kzt_savings_flow_bytes_total{client_cloud_availability_zone="a"' in text
    assert combined(snap) == {KEY: (100.0, 2e-9)}


def test_summary_is_the_metrics_snapshot_reshaped() -> None:
    labels = schema.DEFAULT_FLOW_AGGREGATION
    snap = {
        "zone_bytes": {("a", "b"): 300.0, ("a", "a"): 50.0},
        "flow_bytes": {
            ("shop", "Deployment", "web", "a", "shop", "Deployment", "api", "b", "cross-zone"): 200.0,
            ("shop", "Deployment", "web", "a", "shop", "Deployment", "api", "a", "same-zone"): 50.0,
            ("shop", "Deployment", "db", "a", "", "Node", "n-b", "b", "cross-zone"): 100.0,
        },
        "cost": {("shop", "Deployment", "web", "cross-zone"): 4e-6},
        "agents": {("n-a",): 990.0},
    }
    body = summary(snap, labels, 1000.0)
    assert body["zones"] == [
        {"source_zone": "a", "destination_zone": "a", "bytes": 50.0},
        {"source_zone": "a", "destination_zone": "b", "bytes": 300.0},
    ]
    assert [(t["source_workload"], t["destination_workload"], t["bytes"]) for t in body["talkers"]] == [
        ("web", "api", 200.0),
        ("db", "n-b", 100.0),
    ]
    assert body["classes"] == [
        {"class": "same-zone", "bytes": 50.0, "usd": 0.0},
        {"class": "cross-zone", "bytes": 300.0, "usd": 4e-6},
    ]
    assert body["agents"] == [{"node": "n-a", "last_report": 990.0, "age_seconds": 10.0, "reporting": False,
                               "datapath": None, "metrics": {}, "exports": {}}]  # fmt: skip
    assert json.loads(summary_body(snap, labels, 1000.0)) == body
    health = [{"node": "n-a", "last_report": 995.0, "reporting": True, "datapath": "netfilter",
               "metrics": {schema.AGENT_FLOWS_TRACKED: 7.0}, "exports": {"ok": 3.0}},
              {"node": "n-b", "last_report": 900.0, "reporting": False, "datapath": None, "metrics": {},
               "exports": {}}]  # fmt: skip
    agents = summary(snap, labels, 1000.0, health=health)["agents"]
    assert agents == [
        {"node": "n-a", "last_report": 990.0, "age_seconds": 10.0, "reporting": True, "datapath": "netfilter",
         "metrics": {schema.AGENT_FLOWS_TRACKED: 7.0}, "exports": {"ok": 3.0}},
        {"node": "n-b", "last_report": 900.0, "age_seconds": 100.0, "reporting": False, "datapath": None,
         "metrics": {}, "exports": {}},
    ]  # fmt: skip
    # An aggregation without the class label has no talkers (and says nothing wrong).
    assert summary(snap, labels[:-1], 1000.0)["talkers"] == []


def test_savings_body_round_trips() -> None:
    tracker = _tracker(Index(), Clock(), {KEY: (1.0, 0.0)})
    report = tracker.step()
    assert report_from_json(json.loads(savings_body(report))) == report
