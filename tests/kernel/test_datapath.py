"""Exactness on the real kernel: bytes and packets per flow for UDP, TCP, ICMP over IPv4 and IPv6 against
the IP-level truth (UDP/ICMP: computed from what was sent; TCP: nftables counters at the receivers, which
see the segments the GSO packets became after the hook; more of that in test_datapath_wire.py),
IPv6 extension headers and fragments, and the source address surviving masquerade.

Every test runs in every mode (`MODES`). What a mode cannot see by design is asserted as what it sees
instead: `tc` counts after source NAT (a masqueraded pod's packets are the node's), `cgroup` counts what
the socket sent before the stack fragments it (one packet per datagram)."""

from __future__ import annotations

import ipaddress

import pytest

from otel_kzt.agent.flows import ORIGIN_UNKNOWN, FlowCounters, FlowKey, Snapshot
from tests.kernel.conftest import MODES, DatapathFactory, Net, settle

pytestmark = [pytest.mark.kernel, pytest.mark.parametrize("mode", MODES, indirect=True)]

UDP, TCP, ICMP, ICMPV6 = 17, 6, 1, 58


def key(
    src: str, dst: str, proto: int, sport: int = 0, dport: int = 0, *, origin: int = ORIGIN_UNKNOWN
) -> FlowKey:
    """A flow key; the test pods' traffic, forwarded with its own source, has origin 0 in every mode."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return FlowKey(s.version, s.packed, d.packed, proto, sport, dport, origin)


def flow(snap: Snapshot, k: FlowKey) -> FlowCounters:
    assert k in snap.flows, f"{k} not among {list(snap.flows)}"
    return snap.flows[k]


def ip_header(address: str) -> int:
    return 40 if ":" in address else 20


@pytest.mark.parametrize("family", [4, 6])
def test_udp_exact(net: Net, datapath: DatapathFactory, family: int) -> None:
    dp = datapath()
    src, dst = (net.a4, net.b4) if family == 4 else (net.a6, net.b6)
    net.traffic(net.pod_a, "udp", dst, 5353, 7, 100)
    net.traffic(net.pod_a, "udp", dst, 5353, 5, 1000)
    settle()
    got = flow(dp.snapshot(), key(src, dst, UDP, dport=5353))
    header = ip_header(src) + 8
    assert (got.bytes, got.packets) == (7 * (header + 100) + 5 * (header + 1000), 12)


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_exact(net: Net, datapath: DatapathFactory, family: int, mode: str) -> None:
    dp = datapath()
    src, dst = (net.a4, net.b4) if family == 4 else (net.a6, net.b6)
    proto = ICMP if family == 4 else ICMPV6
    result = net.traffic(net.pod_a, "icmp", dst, 9, 56)
    assert result["replies"] == 9
    settle()
    snap = dp.snapshot()
    size = ip_header(src) + 8 + 56
    if mode == "cgroup":  # echo replies come from the kernel's own socket, in the root cgroup: not below
        assert key(dst, src, proto) not in snap.flows  # the test's cgroup root (a node's root sees them)
        assert (flow(snap, key(src, dst, proto)).bytes, flow(snap, key(src, dst, proto)).packets) == (
            9 * size,
            9,
        )
        return
    for k in (key(src, dst, proto), key(dst, src, proto)):  # requests, and replies forwarded back
        got = flow(snap, k)
        assert (got.bytes, got.packets) == (9 * size, 9)


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_matches_what_arrives(net: Net, datapath: DatapathFactory, topo: object, family: int) -> None:
    """A bulk transfer whose GSO packets are segmented after the hook: nftables at each receiver counts
    the segments that arrive, the datapath's counts equal them (wire-exact, DESIGN §3)."""
    src, dst = (net.a4, net.b4) if family == 4 else (net.a6, net.b6)
    net.segment_after_node()
    net.count_received(net.pod_b, src, dst, match="tcp dport 8080", name="kdfwd")
    net.count_received(net.pod_a, dst, src, match="tcp sport 8080", name="kdback")
    net.count_leaving_node(src, dst, match="tcp dport 8080", name="kdbuffers")
    net.serve_tcp(topo, net.pod_b, 8080)  # type: ignore[arg-type]
    dp = datapath()
    net.traffic(net.pod_a, "tcp-send", dst, 8080, 8_000_000)
    settle()
    snap = dp.snapshot()
    fwd = flow(snap, key(src, dst, TCP, dport=8080))
    back = flow(snap, key(dst, src, TCP, sport=8080))
    wire_bytes, wire_packets = net.nft_counter("kdfwd", ns=net.pod_b)
    assert wire_packets > 8_000_000 // 1500  # segments reached pod B, not the sender's super-packets
    # ...which did pass the node (and every mode's hook) whole: else counting buffers would pass too
    assert net.nft_counter("kdbuffers")[1] * 2 < wire_packets
    assert (fwd.bytes, fwd.packets) == (wire_bytes, wire_packets)
    assert (back.bytes, back.packets) == net.nft_counter("kdback", ns=net.pod_a)


def test_ipv6_extension_header_keeps_port(net: Net, datapath: DatapathFactory) -> None:
    dp = datapath()
    net.traffic(net.pod_a, "udp-dstopts", net.b6, 4444, 6, 200)
    settle()
    got = flow(dp.snapshot(), key(net.a6, net.b6, UDP, dport=4444))
    assert (got.bytes, got.packets) == (6 * (40 + 8 + 8 + 200), 6)


@pytest.mark.parametrize("family", [4, 6])
def test_fragments_counted_later_ones_without_port(
    net: Net, datapath: DatapathFactory, family: int, mode: str
) -> None:
    src, dst = (net.a4, net.b4) if family == 4 else (net.a6, net.b6)
    ip = "ip" if family == 4 else "ip6"
    net.nft(f"""
        table inet kd {{
            counter kdall {{ }}
            chain post {{
                type filter hook postrouting priority 0; policy accept;
                {ip} saddr {src} {ip} daddr {dst} counter name kdall
            }}
        }}""")
    dp = datapath()
    net.traffic(net.pod_a, "udp", dst, 7777, 4, 4000)  # 4000 bytes over a 1500 MTU: 3 fragments each
    settle()
    snap = dp.snapshot()
    first = flow(snap, key(src, dst, UDP, dport=7777))
    if mode == "cgroup":  # socket egress: each datagram whole, before the stack fragments it
        assert (first.bytes, first.packets) == (4 * (ip_header(src) + 8 + 4000), 4)
        assert key(src, dst, UDP) not in snap.flows
        return
    later = flow(snap, key(src, dst, UDP))
    assert first.packets == 4
    assert later.packets == 8
    assert (first.bytes + later.bytes, first.packets + later.packets) == net.nft_counter("kdall")


def test_masquerade_keeps_pod_source(net: Net, datapath: DatapathFactory, mode: str) -> None:
    net.nft(f"""
        table ip kdnat {{
            chain post {{
                type nat hook postrouting priority srcnat; policy accept;
                ip saddr {net.a4} oifname "kdnb0" masquerade
            }}
        }}""")
    # Pod B counts what it receives from the node's address: proof that the masquerade happened.
    net.nft(
        f"""
        table inet kd {{
            counter kdmasq {{ }}
            chain input {{
                type filter hook input priority 0; policy accept;
                ip saddr {net.node_b4} icmp type echo-request counter name kdmasq
            }}
        }}""",
        ns=net.pod_b,
    )
    dp = datapath()
    net.traffic(net.pod_a, "icmp", net.b4, 3, 20)
    settle()
    snap = dp.snapshot()
    assert net.nft_counter("kdmasq", ns=net.pod_b)[1] == 3
    if mode == "tc":  # device egress, after source NAT: the pod's packets carry the node's address
        assert flow(snap, key(net.node_b4, net.b4, ICMP)).packets == 3
        assert key(net.a4, net.b4, ICMP) not in snap.flows
        return
    assert flow(snap, key(net.a4, net.b4, ICMP)).packets == 3
    assert not any(k.src == ipaddress.ip_address(net.node_b4).packed for k in snap.flows)
