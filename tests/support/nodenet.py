"""One node namespace behind a veth pair from the root namespace: where the agent tests run a real agent
(its OTLP receiver and API server stay in the root namespace, the node's traffic crosses the veth)."""

from __future__ import annotations

from otel_kzt import netns


def node_behind_veth(topo: netns.Topology, ns: str, prefix: str, root_ip: str, node_ip: str) -> None:
    """`ns` with `node_ip`/30 on `<prefix>u`, the root namespace with `root_ip`/30 on `<prefix>r`. IPv6 is
    off in the node: router solicitations and MLD reports would be flows of their own."""
    topo.netns(ns)
    topo.veth(None, f"{prefix}r", ns, f"{prefix}u", a_addrs=[f"{root_ip}/30"], b_addrs=[f"{node_ip}/30"])
    netns.run_in(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
