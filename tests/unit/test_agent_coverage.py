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
    for _ in range(3):
        now[0] += 10
        links.send(10**6, 1000)
        counted += 1000  # the CNI bypasses the hook: almost nothing seen
        assert check.observe(counted) == pytest.approx(0.001)
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


def test_counters_that_restart_give_no_verdict() -> None:
    links = Links()
    check = CoverageCheck("cgroup", uplinks=lambda: {"eth0"}, links=links)
    check.observe(5 * 10**6)
    links.send(10**6, 1000)
    assert math.isnan(check.observe(0))  # the datapath was reset under us
