"""The agents' health on the enricher's /metrics: what a real agent pass sends as kzt.agent.* telemetry
comes out per node, equal to that agent's own /metrics; stale replicas stop showing it; the last-report
gauge outlives silence while the node exists; the cap is counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.agent.config import AgentConfig
from otel_kzt.agent.export import ExportResult
from otel_kzt.agent.flows import DeviceCounts
from otel_kzt.agent.healthport import HealthPort
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.service import AgentService
from otel_kzt.enricher.state.agents import AgentsHealth
from tests.unit.test_agent_local import index, key
from tests.unit.test_agent_support import FakeMap
from tests.unit.test_enricher_core import FakeIndex, make_core

NODE = "n-a1"  # a node of test_enricher_core's metadata


class Capture:
    """An agent Sender that keeps the requests (delivered: all ok)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def export(self, requests: Iterable[bytes], deadline: float, stop: threading.Event) -> ExportResult:
        self.requests += list(requests)
        return ExportResult(sent=1)


class FakeDevices:
    """A tc datapath's device re-scan: the counts given, in turn; an exception is raised."""

    def __init__(self, *results: DeviceCounts | Exception) -> None:
        self.results = list(results)
        self.rescans = 0

    def rescan_devices(self) -> DeviceCounts | None:
        self.rescans += 1
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def agent_pass(
    node: str = NODE, overflow: tuple[int, int] = (5_000, 7), devices: FakeDevices | None = None
) -> tuple[AgentService, bytes]:
    fake = FakeMap(capacity=4)
    for port in (80, 443, 5432):
        fake.add(key("10.0.1.5", "10.0.2.7", dport=port), 1000)
    fake.overflow = overflow
    sender = Capture()
    svc = AgentService(
        AgentConfig(node_name=node), fake, sender, LocalFlows(node, index(), interface_addresses=frozenset),
        index(), host_name="h", devices=devices,
    )  # fmt: skip
    svc.export_once(time.monotonic() + 5, threading.Event())
    return svc, sender.requests[-1]


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_a_real_agent_pass_through_the_core_equals_the_agents_own_metrics() -> None:
    svc, payload = agent_pass()
    clock = [100.0]
    agents = AgentsHealth(FakeIndex(), clock=lambda: clock[0])
    core, _, registry, sink = make_core(FakeIndex(), agents=agents, clock=lambda: clock[0])
    registry.register(agents)
    core.consume_metrics(ExportMetricsServiceRequest.FromString(payload), raw=payload)
    assert sink.metrics  # the telemetry passes through to the exporters too
    got = scrape(registry)
    own = HealthPort("127.0.0.1", 0, svc.health).registry  # the agent's /metrics registry (not started)
    for (name, labels), value in scrape(own).items():
        if name == schema.AGENT_EXPORTS + "_total":
            continue  # the agent's own count includes this very export; its telemetry was built before
        assert got[(name, tuple(sorted((("k8s_node_name", NODE), *labels))))] == value, name
    assert got[(schema.AGENT_OVERFLOW_BYTES + "_total", (("k8s_node_name", NODE),))] == 5_000
    assert got[(schema.AGENT_FLOWS_TRACKED, (("k8s_node_name", NODE),))] == 3
    assert got[(schema.AGENT_MAP_FILL_RATIO, (("k8s_node_name", NODE),))] == 0.75
    assert got[(schema.AGENT_DATAPATH_INFO, (("datapath", "netfilter"), ("k8s_node_name", NODE)))] == 1
    assert got[(schema.AGENT_EXPORTS + "_total", (("k8s_node_name", NODE), ("result", "ok")))] == 0
    assert got[(schema.AGENT_LAST_REPORT, (("k8s_node_name", NODE),))] == 100.0


def test_a_tc_agents_device_counts_reach_the_enricher_as_on_its_own_metrics() -> None:
    devices = FakeDevices(DeviceCounts(hooked=2, added=3, removed=1, covered=1))
    svc, payload = agent_pass(devices=devices)
    assert devices.rescans == 1  # every pass re-scans
    agents = AgentsHealth(FakeIndex(), clock=lambda: 100.0)
    registry = CollectorRegistry()
    registry.register(agents)
    agents.observe(
        NODE,
        ExportMetricsServiceRequest.FromString(payload).resource_metrics[0].scope_metrics[0].metrics,
        100.0,
    )
    got = scrape(registry)
    own = scrape(HealthPort("127.0.0.1", 0, svc.health).registry)
    node = ("k8s_node_name", NODE)
    changes = schema.AGENT_DATAPATH_DEVICE_CHANGES + "_total"
    assert got[(schema.AGENT_DATAPATH_DEVICES, (node,))] == own[(schema.AGENT_DATAPATH_DEVICES, ())] == 2
    for change, value in (("added", 3), ("removed", 1), ("covered", 1)):
        label = (schema.AGENT_DEVICE_CHANGE_LABEL, change)
        assert got[(changes, (label, node))] == own[(changes, (label,))] == value, change
    assert agents.health()[0]["metrics"][f'{changes.removesuffix("_total")}{{change="added"}}'] == 3


def test_a_failing_device_rescan_costs_the_export_nothing_and_keeps_the_last_counts() -> None:
    fake = FakeMap(capacity=4)
    fake.add(key("10.0.1.5", "10.0.2.7", dport=80), 1000)
    devices = FakeDevices(DeviceCounts(1, 0, 0, 0), RuntimeError("ip: no such file"))
    sender = Capture()
    svc = AgentService(
        AgentConfig(node_name=NODE), fake, sender, LocalFlows(NODE, index(), interface_addresses=frozenset),
        index(), host_name="h", devices=devices,
    )  # fmt: skip
    for _ in range(2):
        assert svc.export_once(time.monotonic() + 5, threading.Event()).sent == 1
    assert devices.rescans == 2
    report = svc.health.report
    assert report is not None and report.devices == DeviceCounts(1, 0, 0, 0)
    assert svc.stats.view().exports_failed == 0


def test_no_device_counts_in_the_other_modes() -> None:
    svc, payload = agent_pass()
    own = scrape(HealthPort("127.0.0.1", 0, svc.health).registry)
    assert not [k for k in own if k[0].startswith(schema.AGENT_DATAPATH_DEVICES)]  # absent, not 0
    names = {
        m.name
        for m in ExportMetricsServiceRequest.FromString(payload).resource_metrics[0].scope_metrics[0].metrics
    }
    assert schema.OTLP_AGENT_DATAPATH_DEVICES not in names


def test_stale_health_goes_the_last_report_stays_while_the_node_exists() -> None:
    _, payload = agent_pass()
    metrics = ExportMetricsServiceRequest.FromString(payload).resource_metrics[0].scope_metrics[0].metrics
    clock = [0.0]
    idx = FakeIndex()
    agents = AgentsHealth(idx, fresh_s=120, retention_s=3600, clock=lambda: clock[0])
    agents.observe(NODE, metrics, 0.0)
    agents.observe("gone-node", metrics, 0.0)  # not in the metadata
    registry = CollectorRegistry()
    registry.register(agents)
    clock[0] = 121.0
    got = scrape(registry)
    assert got[(schema.AGENT_LAST_REPORT, (("k8s_node_name", NODE),))] == 0.0  # silent: still there
    assert (schema.AGENT_LAST_REPORT, (("k8s_node_name", "gone-node"),)) not in got  # left the cluster
    assert not any(name == schema.AGENT_FLOWS_TRACKED for name, _ in got)  # health only while fresh
    clock[0] = 3601.0
    assert not any(name == schema.AGENT_LAST_REPORT for name, _ in scrape(registry))  # retention over


def test_the_cap_refuses_new_nodes_and_counts_them() -> None:
    _, payload = agent_pass()
    metrics = ExportMetricsServiceRequest.FromString(payload).resource_metrics[0].scope_metrics[0].metrics
    agents = AgentsHealth(None, max_agents=2, clock=lambda: 0.0)
    for node in ("a", "b", "c"):
        agents.observe(node, metrics, 0.0)
    registry = CollectorRegistry()
    registry.register(agents)
    got = scrape(registry)
    assert got[(schema.ENRICHER_AGENTS_REFUSED + "_total", ())] == 1
    assert {dict(labels)["k8s_node_name"] for name, labels in got if name == schema.AGENT_LAST_REPORT} == {
        "a",
        "b",
    }
