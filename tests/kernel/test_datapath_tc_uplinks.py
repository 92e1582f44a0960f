"""The `tc` mode on a node with two uplinks (DESIGN §3a: "every device that leaves the node, secondary ENIs
too"), with tcx links and with classic clsact filters (kernels before 6.6), by its default device choice
(no `--tc-devices`): the main table's default route leaves by kdu1, pod B's traffic leaves by kdu2
through policy routing (`ip rule from <pod B> lookup 102`, the default route of table 102), as the AWS
VPC CNI routes the pods of a secondary ENI.

    kd-a (pod A) ─ kdna0 ┐              ┌ kdu1 ═ eth0 kd-p1 (peer 1)   remote 10.79.0.2 fd79::2 on lo
                         ├ kd-n (node) ─┤
    kd-b (pod B) ─ kdnb0 ┘              └ kdu2 ═ eth0 kd-p2 (peer 2)   remote 10.79.0.2 fd79::2 on lo

Both peers hold the same remote address, so only the routing decides the uplink. nftables at each peer's
PREROUTING is the oracle: each flow's bytes and packets equal what arrived at its peer (UDP flows, and a
TCP bulk transfer segmented after the hook), and nothing of it arrived at the other peer, so the datapath
counted it once, at the uplink it left by, never also at the other one or at a pod-facing device.

Devices are chosen again while the datapath runs (tcwatch.py, every agent interval): a second uplink
plugged in after the start is hooked by the next re-scan and its flows counted exactly from then on,
pinned like the start's; renamed, it keeps its attachment; unplugged, its link, fd and pin go, and the
first uplink counts on throughout. A restart adopts what the re-scan hooked.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import bpfsys, pins, tc, tclinks
from otel_kzt.agent.flows import DeviceCounts, Snapshot
from tests.kernel.conftest import PIN_ROOT, DatapathFactory, Net, settle
from tests.kernel.test_datapath import TCP, UDP, flow, ip_header, key

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.parametrize("mode", ["tc"], indirect=True),
    pytest.mark.parametrize("attach", ["tcx", "classic"]),  # classic: kernels before 6.6 (EKS on 6.1)
]

REMOTE = {4: "10.79.0.2", 6: "fd79::2"}
TABLE = "102"  # pod B's policy-routing table: the secondary ENI's
UDP_FIRST, UDP_FLOWS, UDP_ROUNDS, UDP_SIZE = 7000, 8, 3, 300
TCP_PORT, TCP_BYTES = 8080, 3_000_000


@pytest.fixture(autouse=True)
def attach_by(attach: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if attach == "classic":
        monkeypatch.setenv(tc.CLASSIC_ENV, "1")


def uplink(net: Net, topo: netns.Topology, index: int) -> tuple[str, str]:
    """Uplink kdu<index> from the node to peer kd-p<index>; returns (device, peer netns)."""
    device, peer = f"kdu{index}", topo.netns(f"kd-p{index}")
    topo.veth(
        net.node,
        device,
        peer,
        "eth0",
        a_addrs=[f"10.78.{index}.1/30", f"fd78:{index}::1/64"],
        b_addrs=[f"10.78.{index}.2/30", f"fd78:{index}::2/64"],
    )
    for remote in REMOTE.values():
        netns.add_address(peer, "lo", f"{remote}/{128 if ':' in remote else 32}")
    topo.route(peer, "10.77.0.0/16", via=f"10.78.{index}.1")
    topo.route(peer, "fd77::/16", via=f"fd78:{index}::1")
    net.drop_udp_at(peer)  # no ICMP errors back: only what the pods send is counted
    return device, peer


def route_pod_b_by(net: Net, device: str, index: int) -> None:
    """Pod B's traffic leaves by `device`: the default routes of table 102, chosen by its source."""
    for flag, pod_b, gateway in (
        ("-4", "10.77.2.0/24", f"10.78.{index}.2"),
        ("-6", "fd77:2::/64", f"fd78:{index}::2"),
    ):
        netns.ip(net.node, flag, "route", "add", "default", "via", gateway, "dev", device, "table", TABLE)
        netns.ip(net.node, flag, "rule", "add", "from", pod_b, "lookup", TABLE)


def main_default_by(net: Net, index: int) -> None:
    netns.add_route(net.node, "default", via=f"10.78.{index}.2")
    netns.add_route(net.node, "default", via=f"fd78:{index}::2")


def hooked(dp_node: str) -> set[str]:
    """The devices the node's pinned tc links stand for."""
    directory = pins.node_dir(dp_node, PIN_ROOT)
    return {tc.device_of_pin(p.name) for p in directory.glob(tc.PIN_PREFIX + "*")}


def count_at_peers(net: Net, peers: list[str], src: str, dst: str, *, match: str, name: str) -> None:
    for i, peer in enumerate(peers, 1):
        net.count_received(peer, src, dst, match=match, name=f"{name}p{i}")


def arrived(net: Net, peers: list[str], name: str) -> list[tuple[int, int]]:
    return [net.nft_counter(f"{name}p{i}", ns=peer) for i, peer in enumerate(peers, 1)]


def udp_flows(net: Net, pod: str, dst: str, first: int) -> None:
    for _ in range(UDP_ROUNDS):
        net.traffic(pod, "udp-ports", dst, first, UDP_FLOWS, UDP_SIZE)


def udp_total(snap: Snapshot, src: str, dst: str, first: int, rounds: int = UDP_ROUNDS) -> tuple[int, int]:
    """The flows' sum, each flow checked to be exactly the datagrams of `rounds` of `udp_flows`."""
    each = (rounds * (ip_header(src) + 8 + UDP_SIZE), rounds)
    for port in range(first, first + UDP_FLOWS):
        got = flow(snap, key(src, dst, UDP, dport=port))
        assert (got.bytes, got.packets) == each, f"{src} -> {dst}:{port}"
    return each[0] * UDP_FLOWS, each[1] * UDP_FLOWS


@pytest.mark.parametrize("family", [4, 6])
def test_two_uplinks_each_flow_counted_once_at_the_uplink_it_left_by(
    net: Net, topo: netns.Topology, datapath: DatapathFactory, family: int
) -> None:
    (up1, peer1), (up2, peer2) = uplink(net, topo, 1), uplink(net, topo, 2)
    peers = [peer1, peer2]
    main_default_by(net, 1)
    route_pod_b_by(net, up2, 2)
    net.segment_after_node((up1, up2))  # GSO packets pass the hook whole, segments reach the peers
    dst = REMOTE[family]
    a, b = (net.a4, net.b4) if family == 4 else (net.a6, net.b6)
    last = UDP_FIRST + UDP_FLOWS - 1
    for pod, name in ((a, "kdua"), (b, "kdub")):
        count_at_peers(net, peers, pod, dst, match=f"udp dport {UDP_FIRST}-{last}", name=name)
    for pod, name in ((a, "kdta"), (b, "kdtb")):
        count_at_peers(net, peers, pod, dst, match=f"tcp dport {TCP_PORT}", name=name)
    for peer in peers:
        net.serve_tcp(topo, peer, TCP_PORT)
    dp = datapath(tc_devices=())  # the default choice
    assert hooked(dp.config.node_name) == {up1, up2}  # both uplinks, no pod-facing device
    for pod in (net.pod_a, net.pod_b):
        udp_flows(net, pod, dst, UDP_FIRST)
        net.traffic(pod, "tcp-send", dst, TCP_PORT, TCP_BYTES)
    settle()
    snap = dp.snapshot()
    nothing = (0, 0)
    assert arrived(net, peers, "kdua") == [udp_total(snap, a, dst, UDP_FIRST), nothing]
    assert arrived(net, peers, "kdub") == [nothing, udp_total(snap, b, dst, UDP_FIRST)]
    tcp_a, tcp_b = (flow(snap, key(src, dst, TCP, dport=TCP_PORT)) for src in (a, b))
    assert arrived(net, peers, "kdta") == [(tcp_a.bytes, tcp_a.packets), nothing]
    assert arrived(net, peers, "kdtb") == [nothing, (tcp_b.bytes, tcp_b.packets)]
    assert tcp_a.packets > TCP_BYTES // 1500 and tcp_b.packets > TCP_BYTES // 1500  # segments, both


def links_of(prog_id: int) -> list[dict[str, Any]]:
    """The kernel's links running program `prog_id` (what a leak would leave)."""
    listed = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return [link for link in json.loads(listed.stdout or "[]") if link.get("prog_id") == prog_id]


def bpf_link_fds() -> int:
    """This process's open BPF link fds."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if _target(fd) == "anon_inode:bpf_link")


def _target(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def pinned_link_id(node: str, device: str) -> int:
    fd = bpfsys.obj_get(str(pins.node_dir(node, PIN_ROOT) / tc.pin_name(device)))
    try:
        link = tclinks.tcx_info(fd)
        assert link is not None
        return link.link_id
    finally:
        os.close(fd)


def dispatcher_id(node: str, device: str) -> int:
    """The program a device's pin runs: the dispatcher (tcx: the link's program; classic: the pin's)."""
    fd = bpfsys.obj_get(str(pins.node_dir(node, PIN_ROOT) / tc.pin_name(device)))
    try:
        link = tclinks.tcx_info(fd)
        return link.prog_id if link is not None else bpfsys.prog_info(fd).prog_id
    finally:
        os.close(fd)


def test_an_uplink_plugged_in_while_running_is_hooked_by_the_rescan_and_let_go_when_unplugged(
    net: Net, topo: netns.Topology, datapath: DatapathFactory, attach: str, caplog: pytest.LogCaptureFixture
) -> None:
    up1, peer1 = uplink(net, topo, 1)
    main_default_by(net, 1)
    dst, a, b = REMOTE[4], net.a4, net.b4
    pod_a_ports = f"udp dport {UDP_FIRST}-{UDP_FIRST + UDP_FLOWS - 1}"
    net.count_received(peer1, a, dst, match=pod_a_ports, name="kdhap1")
    dp = datapath(tc_devices=())
    node = dp.config.node_name
    assert hooked(node) == {up1}
    assert dp.rescan_devices() == DeviceCounts(hooked=1, added=0, removed=0, covered=0)  # nothing new
    links_at_start = bpf_link_fds()
    dispatcher = dispatcher_id(node, up1)
    udp_flows(net, net.pod_a, dst, UDP_FIRST)  # counted at kdu1

    up2, peer2 = uplink(net, topo, 2)  # plugged in while the datapath runs
    route_pod_b_by(net, up2, 2)
    peers = [peer1, peer2]
    before, hot = UDP_FIRST + 100, UDP_FIRST + 200
    count_at_peers(net, peers, b, dst, match=f"udp dport {before}-{before + UDP_FLOWS - 1}", name="kdhu")
    count_at_peers(net, peers, b, dst, match=f"udp dport {hot}-{hot + UDP_FLOWS - 1}", name="kdhl")
    udp_flows(net, net.pod_b, dst, before)  # before the re-scan: left by kdu2 unseen
    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    assert dp.rescan_devices() == DeviceCounts(hooked=2, added=1, removed=0, covered=0)
    assert f"hooked while running device={up2} reason=route" in caplog.text
    assert hooked(node) == {up1, up2}  # pinned like the start's
    assert dispatcher_id(node, up2) == dispatcher  # the loaded dispatcher, no new load
    assert bpf_link_fds() == links_at_start + (attach == "tcx")
    udp_flows(net, net.pod_b, dst, hot)
    udp_flows(net, net.pod_a, dst, UDP_FIRST)
    settle()
    snap = dp.snapshot()
    assert arrived(net, peers, "kdhu")[0] == (0, 0)
    assert arrived(net, peers, "kdhu")[1][1] == UDP_FLOWS * UDP_ROUNDS  # it left by kdu2 ...
    assert not [k for k in snap.flows if k.dst_port in range(before, before + UDP_FLOWS)]  # before the hook
    assert arrived(net, peers, "kdhl") == [(0, 0), udp_total(snap, b, dst, hot)]  # exact from the hook on
    assert arrived(net, [peer1], "kdha") == [udp_total(snap, a, dst, UDP_FIRST, rounds=2 * UDP_ROUNDS)]

    netns.ip(net.node, "link", "set", up2, "down")  # a rename needs the device down: between two scans
    netns.ip(net.node, "link", "set", up2, "name", "kdv2")
    netns.ip(net.node, "link", "set", "kdv2", "up")
    # Its routes went with the down (and its IPv6 addresses): table 102's IPv4 default again, its
    # gateway resolved before the pod's datagrams (they would wait for ARP, and some be dropped).
    netns.ip(net.node, "-4", "route", "add", "default", "via", "10.78.2.2", "dev", "kdv2", "table", TABLE)
    netns.run_in(net.node, ["ping", "-c1", "-W2", "10.78.2.2"])
    assert dp.rescan_devices() == DeviceCounts(hooked=2, added=1, removed=0, covered=0)
    assert hooked(node) == {up1, "kdv2"}  # the pin moved, the attachment stayed
    assert bpf_link_fds() == links_at_start + (attach == "tcx")
    udp_flows(net, net.pod_b, dst, hot)
    settle()
    snap = dp.snapshot()
    assert arrived(net, peers, "kdhl") == [(0, 0), udp_total(snap, b, dst, hot, rounds=2 * UDP_ROUNDS)]

    netns.delete_link(net.node, "kdv2")  # unplugged
    assert dp.rescan_devices() == DeviceCounts(hooked=1, added=1, removed=1, covered=0)
    assert "unhooked device=kdv2 gone" in caplog.text
    assert hooked(node) == {up1}
    assert bpf_link_fds() == links_at_start  # its fd closed ...
    if attach == "tcx":  # ... and no link of the dispatcher left but kdu1's
        assert [link["id"] for link in links_of(dispatcher)] == [pinned_link_id(node, up1)]
    udp_flows(net, net.pod_a, dst, UDP_FIRST)
    settle()
    snap = dp.snapshot()
    assert arrived(net, [peer1], "kdha") == [udp_total(snap, a, dst, UDP_FIRST, rounds=3 * UDP_ROUNDS)]


def test_an_uplink_hooked_while_running_is_adopted_by_the_next_start(
    net: Net, topo: netns.Topology, datapath: DatapathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    up1, peer1 = uplink(net, topo, 1)
    main_default_by(net, 1)
    dst, b = REMOTE[4], net.b4
    first = datapath(tc_devices=())
    node = first.config.node_name
    up2, peer2 = uplink(net, topo, 2)
    route_pod_b_by(net, up2, 2)
    peers = [peer1, peer2]
    count_at_peers(net, peers, b, dst, match=f"udp dport {UDP_FIRST}-{UDP_FIRST + UDP_FLOWS - 1}", name="kdr")
    assert first.rescan_devices() == DeviceCounts(hooked=2, added=1, removed=0, covered=0)
    udp_flows(net, net.pod_b, dst, UDP_FIRST)  # through the link the re-scan made

    first.close()  # a restart: the pins hold both attachments
    caplog.clear()
    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    second = datapath(tc_devices=())
    assert hooked(node) == {up1, up2}
    assert f"adopted device={up1} " in caplog.text and f"adopted device={up2} " in caplog.text
    udp_flows(net, net.pod_b, dst, UDP_FIRST)
    settle()
    snap = second.snapshot()
    assert arrived(net, peers, "kdr") == [(0, 0), udp_total(snap, b, dst, UDP_FIRST, rounds=2 * UDP_ROUNDS)]
