"""The agent's health: alive while its loop passes, ready while attached + synced + delivering, and its own
/metrics (Prometheus text, DESIGN §4 names without the node label) equal to the last pass's snapshot; the
endpoint served for real over HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.agent.command import load_config
from otel_kzt.agent.flows import AF_INET6, FlowKey
from otel_kzt.agent.health import AgentReport, Health, map_fill_ratio, metadata_state
from otel_kzt.agent.healthport import HealthPort
from tests.unit.test_agent_service import FORWARDED, NODE_FLOW, POD_FLOW, once, receiver, service
from tests.unit.test_agent_support import Failure, FakeMap, GrpcReceiver

__all__ = ["receiver"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_alive_while_the_loop_passes_within_three_intervals() -> None:
    clock = Clock()
    health = Health(2.0, clock=clock)
    assert health.alive()[0]  # starting: not judged before the loop runs
    health.loop_ran()
    clock.now += 5.9
    assert health.alive()[0]
    clock.now += 0.2
    ok, why = health.alive()
    assert not ok and "interval loop stuck" in why and "6s" in why


def test_ready_lists_every_failing_check() -> None:
    clock = Clock()
    health = Health(1.0, clock=clock)
    health.add_check("datapath", lambda: "not attached")
    health.add_check("metadata", lambda: None)
    ok, failing = health.ready()
    assert not ok and failing == ["datapath: not attached", "export: no export delivered yet"]
    health.add_check("datapath", lambda: None)
    health.delivered()
    assert health.ready() == (True, [])
    clock.now += 3.5
    ok, failing = health.ready()
    assert not ok and failing[0].startswith("export: last export delivered 3.5s ago")


def test_fill_ratio_is_the_fuller_family() -> None:
    fake = FakeMap(capacity=4)
    fake.add(POD_FLOW, 1)
    fake.add(NODE_FLOW, 1)
    fake.add(FlowKey(AF_INET6, b"\x01" * 16, b"\x02" * 16, 17, 0, 53), 1)
    assert map_fill_ratio(fake.snapshot()) == 0.5  # 2 of 4 IPv4 entries, 1 of 4 IPv6: not 3/4


def test_metadata_state_names_a_missing_source() -> None:
    assert metadata_state(None)[0] is False and "not configured" in metadata_state(None)[1]


def test_a_pass_publishes_the_snapshot_and_marks_delivery(receiver: GrpcReceiver) -> None:
    fake = FakeMap(capacity=100)
    for k in (POD_FLOW, NODE_FLOW, FORWARDED):
        fake.add(k, 1000, 2)
    fake.overflow = (77, 3)
    svc, exp = service(receiver, fake)
    once(svc)
    report = svc.health.report
    assert report == AgentReport(3, 0.03, 77, 3, 1, 0, True, "netfilter")
    assert svc.health.ready() == (True, [])
    receiver.fail_next(*[Failure(grpc.StatusCode.UNAVAILABLE)] * 50)
    once(svc, deadline_s=0.3)
    exp.close()
    assert svc.health.report is not None and svc.health.report.exports_failed == 1
    assert svc.health.ready()[0]  # the last delivery is recent: one failed interval is not "not ready"


def test_health_endpoint_flag() -> None:
    from otel_kzt.cli import build_parser
    from otel_kzt.errors import ConfigError

    def endpoint(*flags: str) -> str:
        return load_config(
            build_parser().parse_args(["agent", "--node-name", "n", *flags]), {}
        ).health_endpoint

    assert endpoint() == "0.0.0.0:9465" and endpoint("--health-endpoint", "") == ""
    assert endpoint("--health-endpoint", "127.0.0.1:19465") == "127.0.0.1:19465"
    with pytest.raises(ConfigError, match="health_endpoint"):
        endpoint("--health-endpoint", "9465")


@pytest.fixture
def port() -> Iterator[tuple[Health, int]]:
    health = Health(1.0)
    server = HealthPort("127.0.0.1", 0, health)
    bound = server.start()
    try:
        yield health, bound
    finally:
        server.shutdown()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_endpoint_pages(port: tuple[Health, int]) -> None:
    health, bound = port
    health.add_check("metadata", lambda: "metadata not synced: list pods: HTTP 403 Forbidden: no")
    assert get(bound, "/healthz")[0] == 200
    status, body = get(bound, "/readyz")
    assert status == 503 and "metadata: metadata not synced: list pods: HTTP 403" in body
    assert get(bound, "/metrics") == (200, "")  # nothing before the first pass
    health.publish(AgentReport(5, 0.25, 900, 9, 4, 1, False, "tc", coverage_ratio=0.4))
    families = {f.name: f for f in text_string_to_metric_families(get(bound, "/metrics")[1])}
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert value[schema.AGENT_FLOWS_TRACKED] == 5 and value[schema.AGENT_MAP_FILL_RATIO] == 0.25
    assert value[schema.AGENT_OVERFLOW_BYTES + "_total"] == 900
    assert value[schema.AGENT_OVERFLOW_PACKETS + "_total"] == 9
    assert value[schema.AGENT_METADATA_SYNCED] == 0 and value[schema.AGENT_DATAPATH_COVERAGE] == 0.4
    exports = {
        s.labels[schema.AGENT_RESULT]: s.value
        for s in families[schema.AGENT_EXPORTS].samples
        if s.name.endswith("_total")
    }
    assert exports == {"ok": 4, "failed": 1}
    [info] = families[schema.AGENT_DATAPATH_INFO].samples
    assert info.labels == {schema.AGENT_DATAPATH_LABEL: "tc"} and info.value == 1
    assert schema.AGENT_SERVICE_VIP_BYTES not in families  # not measured by this mode: absent, not 0
    assert not any("node" in label for f in families.values() for s in f.samples for label in s.labels)
    assert get(bound, "/nope")[0] == 404
