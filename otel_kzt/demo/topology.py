"""Builds a `Cluster` out of network namespaces, veth pairs and routes (and takes it down again).

    host (root netns) ── <prefix>-host ┐
    node i  (<prefix>-n<i>)  eth0 ─────┤ bridge br0 in <prefix>-fab ├── <prefix>-inet ("the internet")
       └─ vp<j> ── eth0 of pod j (<prefix>-p<k>): /32 + /128, default via 169.254.1.1 / fe80::1

Nodes route each other's pod networks over the fabric and forward; traffic from pods to anything outside
the cluster networks is masqueraded by the node (nftables), and the internet namespace has no route back
to pods, so only masquerade makes those calls work. Everything is recorded in a `netns.Topology`, whose
`close()` removes it in reverse order.
"""

from __future__ import annotations

import logging
import subprocess

from otel_kzt.demo.cluster import IFACE_FABRIC, POD_GATEWAY_V4, POD_GATEWAY_V6, Cluster, NodeSpec
from otel_kzt.netns import (
    NetnsError,
    Topology,
    add_address,
    add_route,
    delete_link,
    delete_netns,
    enable_forwarding,
    ip,
    netns_path,
    ns_argv,
    run_in,
)

log = logging.getLogger(__name__)

BRIDGE = "br0"


def nft(ns: str | None, ruleset: str) -> None:
    """Load an nftables ruleset inside `ns`."""
    proc = subprocess.run(ns_argv(ns, ["nft", "-f", "-"]), input=ruleset, capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"nft in netns {ns}: {proc.stderr.strip()}")


def _quiet_ipv6(ns: str) -> None:
    # No duplicate address detection and no router solicitations: addresses usable at once, no noise.
    for key in ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.default.router_solicitations=0"):
        run_in(ns, ["sysctl", "-q", "-w", key])


def _masquerade_rules(cluster: Cluster) -> str:
    v4 = ", ".join(cluster.plan.cluster_nets(4))
    v6 = ", ".join(cluster.plan.cluster_nets(6))
    return f"""table inet kzd_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{IFACE_FABRIC}" ip saddr {{ {v4} }} ip daddr != {{ {v4} }} masquerade
        oifname "{IFACE_FABRIC}" ip6 saddr {{ {v6} }} ip6 daddr != {{ {v6} }} masquerade
    }}
}}
"""


def _build_fabric(topo: Topology, cluster: Cluster) -> None:
    plan = cluster.plan
    fab = topo.netns(cluster.fabric_netns)
    ip(fab, "link", "add", BRIDGE, "type", "bridge")
    ip(fab, "link", "set", BRIDGE, "up")
    # The host end, in the root namespace: where agents reach the enricher.
    delete_link(None, cluster.host_link)  # a stale one left by a killed run
    topo.veth(None, cluster.host_link, fab, "host", a_addrs=[f"{plan.host(4)}/24", f"{plan.host(6)}/64"])
    ip(fab, "link", "set", "host", "master", BRIDGE)
    inet = topo.netns(cluster.internet_netns)
    _quiet_ipv6(inet)
    topo.veth(inet, IFACE_FABRIC, fab, "inet",
              a_addrs=[f"{plan.internet_gateway(4)}/24", f"{plan.internet_gateway(6)}/64"])
    ip(fab, "link", "set", "inet", "master", BRIDGE)
    ip(inet, "addr", "add", f"{plan.internet(4)}/32", "dev", "lo")
    ip(inet, "addr", "add", f"{plan.internet(6)}/128", "dev", "lo", "nodad")


def _pod_veth(topo: Topology, node_ns: str, node_if: str, pod_ns: str) -> None:
    # Created with the peer directly in the pod namespace: its name (eth0) is taken on the node.
    ip(node_ns, "link", "add", node_if, "type", "veth", "peer", "name", IFACE_FABRIC, "netns",
       netns_path(pod_ns))
    topo.on_close(f"veth {node_if} in {node_ns}", lambda: delete_link(node_ns, node_if))
    ip(node_ns, "link", "set", node_if, "up")
    ip(pod_ns, "link", "set", IFACE_FABRIC, "up")


def _build_node(topo: Topology, cluster: Cluster, node: NodeSpec) -> None:
    plan = cluster.plan
    ns = topo.netns(node.netns)
    _quiet_ipv6(ns)
    topo.veth(ns, IFACE_FABRIC, cluster.fabric_netns, f"n{node.index}",
              a_addrs=[f"{node.v4}/24", f"{node.v6}/64"])
    ip(cluster.fabric_netns, "link", "set", f"n{node.index}", "master", BRIDGE)
    enable_forwarding(ns)
    for other in cluster.nodes:
        if other.index != node.index:
            add_route(ns, plan.pod_cidr(other.index, 4), via=other.v4)
            add_route(ns, plan.pod_cidr(other.index, 6), via=other.v6)
    add_route(ns, f"{plan.internet(4)}/32", via=plan.internet_gateway(4))
    add_route(ns, f"{plan.internet(6)}/128", via=plan.internet_gateway(6))
    nft(ns, _masquerade_rules(cluster))
    for slot, pod in enumerate(p for p in cluster.pods_on(node) if not p.host_network):
        pod_ns = topo.netns(pod.netns)
        _quiet_ipv6(pod_ns)
        node_if = f"vp{slot}"
        _pod_veth(topo, ns, node_if, pod_ns)
        add_address(ns, node_if, f"{POD_GATEWAY_V4}/32")
        add_address(ns, node_if, f"{POD_GATEWAY_V6}/64")
        add_address(pod_ns, IFACE_FABRIC, f"{pod.v4}/32")
        add_address(pod_ns, IFACE_FABRIC, f"{pod.v6}/128")
        add_route(ns, f"{pod.v4}/32", dev=node_if)
        add_route(ns, f"{pod.v6}/128", dev=node_if)
        ip(pod_ns, "route", "add", POD_GATEWAY_V4, "dev", IFACE_FABRIC, "scope", "link")
        add_route(pod_ns, "default", via=POD_GATEWAY_V4, dev=IFACE_FABRIC, family=4)
        add_route(pod_ns, "default", via=POD_GATEWAY_V6, dev=IFACE_FABRIC, family=6)


def build(cluster: Cluster, topo: Topology) -> None:
    """Create every namespace, link and route of `cluster`, recording each in `topo`."""
    log.info("building topology prefix=%s nodes=%d pods=%d", cluster.prefix, len(cluster.nodes),
             len(cluster.routed_pods()))
    _build_fabric(topo, cluster)
    for node in cluster.nodes:
        _build_node(topo, cluster, node)


def remove_stale(cluster: Cluster) -> None:
    """Remove what a killed run of the same prefix left behind (namespaces take their links along)."""
    names = [cluster.fabric_netns, cluster.internet_netns, *(n.netns for n in cluster.nodes),
             *(p.netns for p in cluster.routed_pods())]
    for name in names:
        delete_netns(name)
    delete_link(None, cluster.host_link)
