"""The blind-datapath check on recorded interface counters: a verdict only when pods sent enough, pods'
devices told from uplinks, tc judged on its hooked devices (same-node traffic not expected), one WARNING
per episode, recovery logged."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

from otel_kzt.agent.coverage import CoverageCheck, devices_sent, pod_sent


def veth(name: str, rx: tuple[int, int], tx: tuple[int, int] = (0, 0), peer: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "ifname": name,
        "link_type": "ether",
        "linkinfo": {"info_kind": "veth"},
        "stats64": {"rx": {"bytes": rx[0], "packets": rx[1]}, "tx": {"bytes": tx[0], "packets": tx[1]}},
    }
    if peer:
        entry["link_netnsid"] = 0
    return entry


class Links:
    """Interface counters that the test moves on between intervals."""

    def __init__(self) -> None:
        self.pod_rx = [0, 0]  # bytes, packets received from the pod (incl. 14-byte headers)
        self.uplink_tx = [0, 0]

    def send(self, pod_bytes: int, packets: int, uplink_bytes: int = 0) -> None:
        self.pod_rx[0] += pod_bytes + 14 * packets
        self.pod_rx[1] += packets
        self.uplink_tx[0] += uplink_bytes + 14 * packets
        self.uplink_tx[1] += packets

    def __call__(self) -> list[dict[str, Any]]:
        return [
            veth("eth0", rx=(999_999, 999), tx=(self.uplink_tx[0], self.uplink_tx[1])),  # the node's uplink
            veth("vp0", rx=(self.pod_rx[0], self.pod_rx[1])),
            veth("orphan", rx=(10**9, 10**6), peer=False),  # both ends here: not a pod's
            {"ifname": "lo", "link_type": "loopback", "stats64": {"rx": {"bytes": 5, "packets": 1}}},
        ]


def test_pod_and_device_traffic_is_ip_level() -> None:
    links = Links()
    links.send(100_000, 100, uplink_bytes=50_000)
    assert pod_sent(links(), uplinks={"eth0"}).bytes == 100_000
    assert devices_sent(links(), {"eth0"}).bytes == 50_000


def test_netkit_pod_devices_count_as_pods_in_either_mode() -> None:
    """Cilium's netkit devices are pods' devices too (docs/datapaths.md): in L3 mode (its default) they have
    no link header (`link_type` none), in L2 mode an Ethernet one; a netkit pair inside the node is not a
    pod's, nor is a device of another kind."""
    l3 = {**veth("nk0", rx=(70_000, 100)), "link_type": "none", "linkinfo": {"info_kind": "netkit"}}
    l2 = {**veth("nk1", rx=(14_000 + 14 * 10, 10)), "linkinfo": {"info_kind": "netkit"}}
    inside = {**veth("nk2", rx=(10**6, 10), peer=False), "linkinfo": {"info_kind": "netkit"}}
    bridge = {**veth("br0", rx=(10**6, 10)), "linkinfo": {"info_kind": "bridge"}}
    assert pod_sent([l3, l2, inside, bridge], uplinks=set()) == pod_sent([l3, l2], uplinks=set())
    assert pod_sent([l3, l2], uplinks=set()).bytes == 70_000 + 14_000
    assert pod_sent([l3, l2], uplinks=set()).packets == 110
    assert pod_sent([l3, l2], uplinks={"nk0"}).bytes == 14_000  # an uplink is never a pod's


def test_no_verdict_on_the_baseline_on_little_traffic_and_without_metadata() -> None:
    links = Links()
    check = CoverageCheck("netfilter", uplinks=lambda: {"eth0"}, links=links)
    assert math.isnan(check.observe(0))  # baseline
    links.send(1000, 10)
    assert math.isnan(check.observe(0))  # pods sent too little to judge
    links.send(10**6, 1000)
    assert math.isnan(check.observe(None))  # pods cannot be told apart
    assert math.isnan(check.observe(10**6))  # a new baseline after that


def test_a_seeing_datapath_is_covered_and_a_blind_one_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    links, now = Links(), [0.0]
    check = CoverageCheck("netfilter", uplinks=lambda: {"eth0"}, links=links, clock=lambda: now[0])
    counted = 0
    check.observe(counted)
    links.send(10**6, 1000)
    counted += 10**6 + 40_000  # wire-exact counting may exceed the per-skb interface bytes
    assert check.observe(counted) == 1.0
    caplog.set_level(logging.INFO, logger="otel_kzt.agent.coverage")
    for expected in (0.041, 0.001, 0.001):  # the first blind span still has the 40,000 bytes' credit
        now[0] += 10
        links.send(10**6, 1000)
        counted += 1000  # the CNI bypasses the hook: almost nothing seen
        assert check.observe(counted) == pytest.approx(expected)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "datapath blind" in warnings[0].getMessage()
    assert "--datapath cgroup" in warnings[0].getMessage()
    links.send(10**6, 1000)
    counted += 10**6
    assert check.observe(counted) == 1.0
    assert "sees the pods' traffic again" in caplog.records[-1].getMessage()


def test_tc_mode_does_not_expect_same_node_traffic() -> None:
    """Pods talk to each other on the node (veth counters move, nothing leaves): tc is not blind."""
    links = Links()
    check = CoverageCheck("tc", uplinks=lambda: {"eth0"}, links=links)
    check.observe(0)
    links.pod_rx[0] += 5 * 10**6  # same-node traffic only
    links.pod_rx[1] += 5000
    assert math.isnan(check.observe(0))  # nothing left through a hooked device: no verdict
    links.send(0, 1000, uplink_bytes=10**6)
    assert check.observe(10**6) == 1.0
    links.send(0, 1000, uplink_bytes=10**6)
    assert check.observe(10**6) == 0.0  # the hooked device sent, the program saw nothing: blind


def test_a_burst_between_the_counters_read_and_the_snapshot_is_no_dip() -> None:
    """The datapath counted a burst the devices' counters (read just before) did not have yet: the next
    span has it on the devices only. The excess carries over, so neither span reads low; a credit never
    exceeds one span's bytes, so a datapath that turns blind reads blind one span later at the most."""
    links = Links()
    check = CoverageCheck("cgroup", uplinks=lambda: {"eth0"}, links=links)
    counted = 0
    check.observe(counted)
    links.send(10**6, 1000)
    counted += 10**6 + 300_000  # a 300 kB burst: counted, not yet on the devices' counters
    assert check.observe(counted) == 1.0
    links.send(10**6 + 300_000, 1300)
    counted += 10**6
    assert check.observe(counted) == 1.0  # without the credit: 0.77
    for _ in range(20):  # wire-exact GSO counting: 5% above the devices' bytes, for good
        links.send(10**6, 1000)
        counted += 1_050_000
        assert check.observe(counted) == 1.0
    links.send(10**6, 1000)
    assert check.observe(counted) <= 0.05  # blind at once: the credit is one span's excess, not twenty
    links.send(10**6, 1000)
    assert check.observe(counted) == 0.0


def test_counters_that_restart_give_no_verdict() -> None:
    links = Links()
    check = CoverageCheck("cgroup", uplinks=lambda: {"eth0"}, links=links)
    check.observe(5 * 10**6)
    links.send(10**6, 1000)
    assert math.isnan(check.observe(0))  # the datapath was reset under us


def _loop(receiver: Any, fake: Any, check: CoverageCheck) -> Any:
    from otel_kzt.agent.config import AgentConfig, OtlpConfig
    from otel_kzt.agent.export import Exporter
    from otel_kzt.agent.local import LocalFlows
    from otel_kzt.agent.service import AgentService
    from tests.unit.test_agent_local import NODE, index

    otlp = OtlpConfig(endpoints=(f"http://127.0.0.1:{receiver.port}",), timeout_s=1.0)
    exporter = Exporter(otlp, NODE, max_backoff_s=0.1)
    idx = index()
    svc = AgentService(
        AgentConfig(node_name=NODE, otlp=otlp, idle_timeout_s=60.0),
        fake,
        exporter,
        LocalFlows(NODE, idx, interface_addresses=frozenset),
        idx,
        host_name="h1",
        coverage=check,
    )
    return svc, exporter


@pytest.mark.parametrize("mode", ["netfilter", "tc"])
def test_the_loop_feeds_pod_flows_evicted_finals_and_overflow(mode: str) -> None:
    """Netfilter/cgroup compare the flows whose source is a local pod (not the node's own, not forwarded
    ones) with the pods' devices; tc compares everything with the hooked devices. An evicted flow's final
    value keeps counting after it left the map, and the overflow bucket counts: a steady node reads 1.0;
    pods that send while the datapath sees nothing read 0."""
    import threading
    import time

    from otel_kzt import schema
    from tests.unit.test_agent_local import key
    from tests.unit.test_agent_service import FORWARDED, NODE_FLOW, POD_FLOW, SEC
    from tests.unit.test_agent_support import FakeMap, GrpcReceiver, points

    other_pod_flow = key("10.0.1.5", "10.0.2.7", dport=6379)
    receiver = GrpcReceiver().start()
    links, fake = Links(), FakeMap()
    check = CoverageCheck(mode, uplinks=lambda: {"eth0"}, links=links)
    svc, exporter = _loop(receiver, fake, check)
    try:

        def interval(
            pod: int, node: int = 0, forwarded: int = 0, overflow: int = 0, seen: bool = True
        ) -> float:
            if seen:
                fake.add(POD_FLOW if fake.now_ns < 30 * SEC + start else other_pod_flow, pod, 100)
                if node:
                    fake.add(NODE_FLOW, node, 10)
                if forwarded:
                    fake.add(FORWARDED, forwarded, 10)
                fake.overflow = (fake.overflow[0] + overflow, 0)
            # The pods' devices got the pods' bytes (the overflow's too: pods sent them); the uplink
            # (tc: the hooked device) what left the node.
            links.send(pod + overflow, 100, uplink_bytes=pod + node + forwarded + overflow)
            svc.export_once(time.monotonic() + 2, threading.Event())
            fake.now_ns += SEC
            return check.ratio

        start = fake.now_ns
        assert math.isnan(interval(200_000))  # the baseline
        assert interval(200_000, node=50_000, forwarded=70_000) == pytest.approx(1.0)
        assert interval(150_000, overflow=60_000) == pytest.approx(1.0)
        fake.now_ns += 61 * SEC  # the first pod flow goes idle: exported, then evicted
        assert interval(100_000) == pytest.approx(1.0)
        assert POD_FLOW in fake.evicted and NODE_FLOW in fake.evicted
        assert interval(100_000) == pytest.approx(1.0)  # its final value stays in the sum
        assert interval(300_000, seen=False) == pytest.approx(0.0)  # pods send, nothing is counted
        ratios = [p["_value"] for p in points(receiver.snapshot()[-1:], schema.OTLP_AGENT_DATAPATH_COVERAGE)]
        assert ratios == [0.0]
    finally:
        exporter.close()
        receiver.stop()
