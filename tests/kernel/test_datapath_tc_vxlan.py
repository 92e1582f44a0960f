"""`tc` mode on a VXLAN overlay between two nodes (DESIGN §3a): pod A on node 1 sends to pod B on node 2
through the overlay, and the pods' flows are counted by their inner addresses, exactly what pod B
receives (nftables in its prerouting: the oracle at the receiver), IPv4 and IPv6 inside, UDP and TCP.

- only the uplink hooked (`--tc-devices` naming it, or an overlay the agent cannot see): every VXLAN
  packet to 4789 or 8472 leaving it is counted as its inner packet, and no node-to-node tunnel flow is;
- the overlay device hooked too: the inner packets are counted there, the uplink counts the tunnel
  (node 1 to node 2) apart, and the agent exports only the pods' flow (the overlay ports rule).

- a VXLAN overlay device on 4789 or 8472 that appears while only the uplink is hooked is left to it (the
  uplink counts its packets as inner ones; its own egress would count them twice, tc.py `covered`),
  counted as covered once, no pin, and the pods' flows are counted exactly, at the uplink, no restart.

- a VLAN-tagged frame inside the VXLAN payload (802.1Q, and QinQ with an 802.1ad outer tag), only the
  uplink hooked: the inner IP header is found past the tags. The kernel has no VLAN devices here
  (no 8021q), so node 1 writes the frames to the overlay with a packet socket, priority-tagged (VLAN ID
  0, which node 2 strips on receive); the first tag's TCI starts with a 4 (priority 2), which a parse
  that skipped no tag would take for an IPv4 header.

The uplink cuts the node's GSO packets (tunnel GSO, `gso_max_segs 1`) after the hook, so pod B receives
segments, which the datapath counts (count.h's kzt_wire).

    kx-a 10.66.1.2 fd66:1::2 ─ kx-1 ══ kvx (VXLAN, 10.66.200.0/24, fd66:200::/64) over kx12 ══ kx-2 ─ kx-b
                         underlay 10.66.12.1 (or fd66:12::1)         10.66.12.2 (::2)     10.66.2.2 fd66:2::2
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import Datapath, DatapathConfig, cleanup, pins, tc
from otel_kzt.agent.flows import DeviceCounts, Snapshot
from otel_kzt.agent.local import LocalFlows
from otel_kzt.k8s.model import Endpoint
from otel_kzt.schema import WorkloadKind
from tests.kernel.conftest import ETHTOOL_SGRO, ETHTOOL_STSO, PIN_ROOT, TRAFFIC, Net, settle
from tests.kernel.test_datapath import TCP, UDP, flow, key
from tests.unit.test_agent_local import attrs_of
from tests.unit.test_agent_support import FakeIndex

pytestmark = pytest.mark.kernel

N1, N2, A, B = "kx-1", "kx-2", "kx-a", "kx-b"
UNDERLAY = {4: ("10.66.12.1", "10.66.12.2"), 6: ("fd66:12::1", "fd66:12::2")}  # node 1's, node 2's
ADDR = {A: ("10.66.1.2", "fd66:1::2"), B: ("10.66.2.2", "fd66:2::2")}
UPLINK, OVERLAY = "kx12", "kvx"
LATE = "kvy"  # a second overlay device, made while the datapath runs
NODE_NAME = "kx-vxlan"
MTU = 1430  # the overlay's (an IPv6 underlay adds 70 bytes to 1500): pod packets fit it whole
UDP_PORT, TCP_PORT, UDP_COUNT, UDP_SIZE = 7301, 7302, 40, 1200


# The tags inside the VXLAN payload (TPID:TCI, outer first): priority 2 and 3, VLAN ID 0.
TAGS = {"vlan": "8100:4000", "qinq": "88a8:4000,8100:6000"}


@dataclass(frozen=True)
class Overlay:
    topo: netns.Topology
    port: int  # the VXLAN UDP port
    family: int  # the underlay's

    def counted(self, name: str) -> tuple[int, int]:
        """(bytes, packets) of pod B's nftables counter `name`."""
        return Net(N1, A, B).nft_counter(name, ns=B)

    def traffic(self, *args: object) -> None:
        netns.run_in(A, [sys.executable, TRAFFIC, *map(str, args)], timeout=120)


def _nodes(topo: netns.Topology, port: int, family: int) -> None:
    for ns in (N1, N2, A, B):
        topo.netns(ns)
    topo.veth(N1, UPLINK, N2, "kx21")
    under1, under2 = UNDERLAY[family]
    for node, dev, address in ((N1, UPLINK, under1), (N2, "kx21", under2)):  # no DAD: usable at once
        netns.ip(node, "addr", "add", f"{address}/{24 if family == 4 else 64}", "dev", dev, "nodad")
    for node, pod, n in ((N1, A, 1), (N2, B, 2)):
        v4, v6 = ADDR[pod]
        topo.veth(node, f"kxp{n}", pod, "eth0", a_addrs=[f"10.66.{n}.1/24", f"fd66:{n}::1/64"],
                  b_addrs=[f"{v4}/24", f"{v6}/64"])  # fmt: skip
        topo.route(pod, "default", via=f"10.66.{n}.1")
        topo.route(pod, "default", via=f"fd66:{n}::1")
        netns.ip(pod, "link", "set", "dev", "eth0", "mtu", str(MTU))
        netns.enable_forwarding(node)
    for node, local, remote, dev, n in ((N1, under1, under2, UPLINK, 1), (N2, under2, under1, "kx21", 2)):
        vxlan = ["type", "vxlan", "id", "42", "local", local, "remote", remote, "dstport", str(port)]
        netns.ip(node, "link", "add", OVERLAY, "mtu", str(MTU), *vxlan, "dev", dev)
        topo.on_close(f"vxlan in {node}", lambda node=node: netns.delete_link(node, OVERLAY))
        netns.add_address(node, OVERLAY, f"10.66.200.{n}/24")
        netns.add_address(node, OVERLAY, f"fd66:200::{n}/64")
        netns.ip(node, "link", "set", OVERLAY, "up")
    topo.route(N1, "10.66.2.0/24", via="10.66.200.2")
    topo.route(N1, "fd66:2::/64", via="fd66:200::2")
    topo.route(N2, "10.66.1.0/24", via="10.66.200.1")
    topo.route(N2, "fd66:1::/64", via="fd66:200::1")
    # Node 1's uplink sends one segment per buffer: the tunnel's GSO packets are cut after the hook.
    netns.ip(N1, "link", "set", "dev", UPLINK, "gso_max_segs", "1")
    Net(N1, A, B).ethtool(N1, UPLINK, ETHTOOL_STSO, 0)
    # Node 2 forwards them as they came (no GRO of the underlay nor of the decapsulated packets), so pod
    # B's counter sees the segments that crossed the wire.
    for device in ("kx21", OVERLAY):
        Net(N1, A, B).ethtool(N2, device, ETHTOOL_SGRO, 0)


def _oracle() -> None:
    """Pod B counts what it receives from pod A per flow (and drops the UDP: no errors come back)."""
    a4, a6 = ADDR[A]
    b4, b6 = ADDR[B]
    Net(N1, A, B).nft(
        ns=B,
        script=f"""
        table inet kd {{
            counter u4 {{ }}
            counter u6 {{ }}
            counter t4 {{ }}
            chain pre {{
                type filter hook prerouting priority -300; policy accept;
                ip saddr {a4} ip daddr {b4} udp dport {UDP_PORT} counter name u4 drop
                ip6 saddr {a6} ip6 daddr {b6} udp dport {UDP_PORT} counter name u6 drop
                ip saddr {a4} ip daddr {b4} tcp dport {TCP_PORT} counter name t4
            }}
        }}""",
    )


def _overlay(port: int, family: int) -> Iterator[Overlay]:
    with netns.Topology() as topo:
        _nodes(topo, port, family)
        _oracle()
        Net(N1, A, B).serve_tcp(topo, B, TCP_PORT)
        cleanup(NODE_NAME, PIN_ROOT)
        topo.on_close("pins", lambda: cleanup(NODE_NAME, PIN_ROOT))
        yield Overlay(topo, port, family)


@pytest.fixture(params=[(4789, 4), (8472, 4), (4789, 6)], ids=["iana", "flannel", "iana-ipv6-underlay"])
def overlay(request: pytest.FixtureRequest) -> Iterator[Overlay]:
    yield from _overlay(*request.param)


def _datapath(overlay: Overlay, devices: tuple[str, ...]) -> Datapath:
    dp = Datapath(DatapathConfig(node_name=NODE_NAME, pin_root=PIN_ROOT, mode="tc", tc_devices=devices))
    overlay.topo.on_close("datapath", dp.close)
    with netns.entered(N1):
        dp.start()
    return dp


def _exported(snap: Snapshot) -> set[tuple[str, str]]:
    """(source, destination) of the flows node 1's agent exports: pod A's, none of the tunnel's."""
    idx = FakeIndex()
    pod_a = Endpoint(NODE_NAME, WorkloadKind.DEPLOYMENT, "a", pod_name="a-1", namespace="kx")
    idx.endpoints = {address: pod_a for address in ADDR[A]}
    node = frozenset({UNDERLAY[4][0], UNDERLAY[6][0], "10.66.200.1", "fd66:200::1"})
    local = LocalFlows(NODE_NAME, idx, interface_addresses=lambda: node)
    local.refresh()
    out = set()
    for k in snap.flows:
        attrs = attrs_of(local, k)
        if attrs is not None:
            out.add((str(attrs["source.address"]), str(attrs["destination.address"])))
    return out


@pytest.mark.parametrize("hooked", [(UPLINK,), (UPLINK, OVERLAY)], ids=["uplink-only", "overlay-too"])
def test_pod_flows_inside_the_tunnel_count_by_their_inner_addresses(
    overlay: Overlay, hooked: tuple[str, ...]
) -> None:
    _counted_by_inner_addresses(overlay, hooked)


@pytest.mark.parametrize("tags", ["vlan", "qinq"])
def test_a_vlan_tagged_inner_frame_counts_by_its_inner_addresses(overlay: Overlay, tags: str) -> None:
    """Over an IPv6 underlay the inner EtherType lies past the outer 64-byte prefix."""
    dp = _datapath(overlay, (UPLINK,))
    (a4, a6), (b4, b6) = ADDR[A], ADDR[B]
    mac = json.loads(netns.ip(N2, "-j", "link", "show", OVERLAY))[0]["address"]
    for src, dst in ((a4, b4), (a6, b6)):
        netns.run_in(N1, [sys.executable, TRAFFIC, "udp-tagged", OVERLAY, mac, src, dst, str(UDP_PORT),
                          str(UDP_COUNT), str(UDP_SIZE), TAGS[tags]], timeout=60)  # fmt: skip
    settle()
    snap = dp.snapshot()
    udp4, udp6 = (UDP_COUNT * (20 + 8 + UDP_SIZE), UDP_COUNT), (UDP_COUNT * (40 + 8 + UDP_SIZE), UDP_COUNT)
    assert (overlay.counted("u4"), overlay.counted("u6")) == (udp4, udp6)  # node 2 took the tagged frames
    for k, counter in ((key(a4, b4, UDP, dport=UDP_PORT), "u4"), (key(a6, b6, UDP, dport=UDP_PORT), "u6")):
        got = flow(snap, k)
        assert (got.bytes, got.packets) == overlay.counted(counter), counter
    assert [k for k in snap.flows if k.proto == UDP and overlay.port in (k.src_port, k.dst_port)] == []


def test_a_vxlan_overlay_appearing_while_only_the_uplink_is_hooked_is_left_to_the_uplink(
    overlay: Overlay,
) -> None:
    dp = _datapath(overlay, (UPLINK, LATE))  # the uplink, and the late overlay once it is there
    assert dp.rescan_devices() == DeviceCounts(hooked=1, added=0, removed=0, covered=0)
    local, remote = UNDERLAY[overlay.family]
    vxlan = ["type", "vxlan", "id", "43", "local", local, "remote", remote, "dstport", str(overlay.port)]
    netns.ip(N1, "link", "add", LATE, *vxlan, "dev", UPLINK)
    overlay.topo.on_close(f"vxlan {LATE}", lambda: netns.delete_link(N1, LATE))
    netns.ip(N1, "link", "set", LATE, "up")
    assert dp.rescan_devices() == DeviceCounts(hooked=1, added=0, removed=0, covered=1)
    assert dp.rescan_devices() == DeviceCounts(hooked=1, added=0, removed=0, covered=1)  # once
    directory = pins.node_dir(NODE_NAME, PIN_ROOT)
    assert sorted(p.name for p in directory.glob(tc.PIN_PREFIX + "*")) == [tc.pin_name(UPLINK)]
    _counted_by_inner_addresses(overlay, (UPLINK,), dp)  # still once each, at the uplink


def _counted_by_inner_addresses(
    overlay: Overlay, hooked: tuple[str, ...], dp: Datapath | None = None
) -> None:
    dp = dp or _datapath(overlay, hooked)
    (a4, a6), (b4, b6) = ADDR[A], ADDR[B]
    overlay.traffic("udp", b4, UDP_PORT, UDP_COUNT, UDP_SIZE)
    overlay.traffic("udp", b6, UDP_PORT, UDP_COUNT, UDP_SIZE)
    overlay.traffic("tcp-send", b4, TCP_PORT, 3_000_000)
    settle()
    snap = dp.snapshot()
    udp4, udp6 = (UDP_COUNT * (20 + 8 + UDP_SIZE), UDP_COUNT), (UDP_COUNT * (40 + 8 + UDP_SIZE), UDP_COUNT)
    assert (overlay.counted("u4"), overlay.counted("u6")) == (udp4, udp6)  # pod B got every datagram
    for k, counter in ((key(a4, b4, UDP, dport=UDP_PORT), "u4"), (key(a6, b6, UDP, dport=UDP_PORT), "u6"),
                       (key(a4, b4, TCP, dport=TCP_PORT), "t4")):  # fmt: skip
        got = flow(snap, k)
        assert (got.bytes, got.packets) == overlay.counted(counter), counter
    assert overlay.counted("t4")[1] > 3_000_000 // MTU
    tunnel = [k for k in snap.flows if k.proto == UDP and overlay.port in (k.src_port, k.dst_port)]
    if hooked == (UPLINK,):
        assert tunnel == []  # every VXLAN packet was counted as its inner one
    else:
        assert tunnel  # the uplink counts the encapsulation apart...
    exported = _exported(snap)  # ...and the agent exports the pod's flows only
    assert {(a4, b4), (a6, b6)} == {e for e in exported if e[0] in ADDR[A]}
    assert not [e for e in exported if e[0] == UNDERLAY[overlay.family][0]]
