"""Where two modes sit beside other programs or paths (DESIGN §3a, docs/datapaths.md):

- `tc` runs first on a device whose egress a CNI's own program already holds (tcx `BPF_F_BEFORE`), and
  hands every packet on (`TCX_NEXT`): the CNI's verdict stands. A CNI program attached before the agent
  drops pod A's IPv4 UDP towards pod B; the datapath counts every datagram (it saw them before the drop)
  and pod B receives none (the drop still happened). Ours placed after the CNI's would count nothing;
  ours ending the chain (`TCX_PASS`) would deliver them.
- `cgroup` skips loopback: a pod's traffic to 127.0.0.1, ::1 or its own address (delivered over `lo`)
  is no flow, while the same pod's traffic to pod B is counted exactly.
"""

from __future__ import annotations

import pytest

from tests.kernel.conftest import DatapathFactory, Net, settle
from tests.kernel.hostrouting import drop_ipv4_udp_program, egress_program
from tests.kernel.test_datapath import UDP, flow, key

pytestmark = pytest.mark.kernel
UDP_V4 = 20 + 8
PORT = 5399


@pytest.mark.parametrize("mode", ["tc"], indirect=True)
def test_tc_runs_before_a_cnis_egress_program_and_keeps_its_verdict(
    net: Net, datapath: DatapathFactory
) -> None:
    net.count_received(net.pod_b, net.a4, net.b4, match=f"udp dport {PORT}", name="kdgot")
    with egress_program(net.node, "kdnb0", drop_ipv4_udp_program(), "kd_cni_drop"):
        dp = datapath()  # attached after the CNI's program: placed before it
        net.traffic(net.pod_a, "udp", net.b4, PORT, 25, 200)
        settle()
        got = flow(dp.snapshot(), key(net.a4, net.b4, UDP, dport=PORT))
        assert (got.bytes, got.packets) == (25 * (UDP_V4 + 200), 25)  # every datagram, seen before the drop
        assert net.nft_counter("kdgot", ns=net.pod_b) == (0, 0)  # the CNI's verdict stood
    net.traffic(net.pod_a, "udp", net.b4, PORT, 5, 200)  # the CNI's program gone: delivered, still counted
    settle()
    assert net.nft_counter("kdgot", ns=net.pod_b) == (5 * (UDP_V4 + 200), 5)
    got = flow(dp.snapshot(), key(net.a4, net.b4, UDP, dport=PORT))
    assert (got.bytes, got.packets) == (30 * (UDP_V4 + 200), 30)


@pytest.mark.parametrize("mode", ["cgroup"], indirect=True)
def test_cgroup_skips_loopback_and_counts_the_rest(net: Net, datapath: DatapathFactory) -> None:
    for ns in (net.pod_a, net.pod_b):
        net.drop_udp_at(ns)  # no port-unreachable answers
    dp = datapath()
    for dst in ("127.0.0.1", "::1", net.a4, net.a6, net.b4):
        net.traffic(net.pod_a, "udp", dst, PORT, 10, 100)
    settle()
    snap = dp.snapshot()
    for src, dst in (("127.0.0.1", "127.0.0.1"), ("::1", "::1"), (net.a4, net.a4), (net.a6, net.a6)):
        assert key(src, dst, UDP, dport=PORT) not in snap.flows, (src, dst)
    got = flow(snap, key(net.a4, net.b4, UDP, dport=PORT))
    assert (got.bytes, got.packets) == (10 * (UDP_V4 + 100), 10)
    assert not [
        k for k in snap.flows if k.dst_port == PORT and k not in {key(net.a4, net.b4, UDP, dport=PORT)}
    ]
