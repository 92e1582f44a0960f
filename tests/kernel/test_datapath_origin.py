"""Who sent it, by its path (DESIGN §3), on the kernel: what the netfilter hook keys and what the agent
exports of it, against nftables counters in the node as the ground truth.

The conftest topology (pod A -- node -- pod B) plays each real-cluster shape with the node's own NAT:

- NodePort with externalTrafficPolicy Cluster: A is the outside client, B the backend on "another node";
  the node DNATs its address:30080 to B:8080 and masquerades (kube-proxy's rules). The hop is the node's,
  counted once after SNAT, its replies are not this node's to count;
- a ClusterIP through kube-proxy DNAT: A (this node's pod) to the VIP, B the backend pod: counted once,
  with the backend pod as destination;
- NodeLocal DNS answering from 169.254.20.10 and from the kube-dns ClusterIP (both on the node's `lo`):
  the node's, named by the node;
- an IPVS-style reply: B's answer gets the VIP as source by a stateless rewrite in the forward chain
  (the VIP is one of the node's addresses, on a kube-ipvs0 stand-in): not counted again here. A node
  that proxies Services always tracks connections (kube-proxy's NAT rules); conntrack is what tells.

Names: netns and devices are the conftest's ("kd"), the nat tables here start with "ko".
"""

from __future__ import annotations

import ipaddress

import pytest

from otel_kzt import netns, schema
from otel_kzt.agent.flows import ORIGIN_LOCAL, ORIGIN_REWRITTEN, ORIGIN_SNAT, FlowKey, Snapshot
from otel_kzt.agent.local import LocalFlows
from otel_kzt.k8s.model import Endpoint, NodeInfo
from otel_kzt.schema import WorkloadKind
from tests.kernel.conftest import MODES, NODE_DEVICES, DatapathFactory, Net, settle
from tests.kernel.test_datapath import TCP, UDP, flow, key
from tests.unit.test_agent_local import attrs_of
from tests.unit.test_agent_support import FakeIndex

pytestmark = pytest.mark.kernel

NODE = "kd-node"
NODE_A4 = "10.77.1.1"  # the node's address towards pod A
DNS_LINK_LOCAL, KUBE_DNS, VIP, VIP6 = "169.254.20.10", "10.96.0.10", "10.96.0.60", "fd96::60"


def index(net: Net) -> FakeIndex:
    """A is a pod of this node; B a pod of another node."""
    idx = FakeIndex()
    client = Endpoint(NODE, WorkloadKind.DEPLOYMENT, "client", pod_name="client-1", namespace="ko")
    backend = Endpoint("kd-other", WorkloadKind.DEPLOYMENT, "backend", pod_name="backend-1", namespace="ko")
    idx.endpoints = {net.a4: client, net.a6: client, net.b4: backend, net.b6: backend}
    idx.nodes = {NODE: NodeInfo(NODE, "z1", "r1", None, (NODE_A4, net.node_b4))}
    return idx


def local_flows(net: Net, *more: str) -> LocalFlows:
    addresses = frozenset({"127.0.0.1", NODE_A4, net.node_b4, DNS_LINK_LOCAL, KUBE_DNS, VIP, *more})
    local = LocalFlows(NODE, index(net), interface_addresses=lambda: addresses)
    local.refresh()
    return local


def exported(local: LocalFlows, snap: Snapshot) -> dict[FlowKey, dict[str, object]]:
    """What the agent exports of the snapshot's IPv4 flows (the node's own IPv6 neighbour discovery and
    MLD are node flows too, and beside the point here)."""
    out = {}
    for k in snap.flows:
        if k.family != 4:
            continue
        attrs = attrs_of(local, k)
        if attrs is not None:
            out[k] = attrs
    return out


def kube_proxy(net: Net, dnat: str, masquerade: str, counted: dict[str, str], table: str = "ip") -> None:
    """kube-proxy's rules in the node (a DNAT, optionally a masquerade; in a `table` family table) and the
    ground truth: nftables counters at POSTROUTING after every NAT, one per name, matching what leaves
    (buffers: so the pods send one segment per buffer)."""
    net.one_segment_per_buffer()
    post = f"chain post {{ type nat hook postrouting priority srcnat; policy accept; {masquerade}; }}"
    counters = "\n".join(f"counter {name} {{ }}" for name in counted)
    rules = "\n".join(f"{rule} counter name {name}" for name, rule in counted.items())
    net.nft(f"""
        table {table} konat {{
            chain pre {{
                type nat hook prerouting priority dstnat; policy accept;
                {dnat}
            }}
            {post if masquerade else ""}
        }}
        table inet kd {{
            {counters}
            chain post {{
                type filter hook postrouting priority 200; policy accept;
                {rules}
            }}
        }}""")


def test_nodeport_hop_is_the_nodes_and_counted_once(
    net: Net, datapath: DatapathFactory, topo: object
) -> None:
    kube_proxy(
        net,
        f"ip daddr {NODE_A4} tcp dport 30080 dnat to {net.b4}:8080",
        f"ct status dnat ip daddr {net.b4} masquerade",
        {
            "hop": f"ip saddr {net.node_b4} ip daddr {net.b4} tcp dport 8080",
            "back": f"ip saddr {NODE_A4} ip daddr {net.a4} tcp sport 30080",
        },
    )
    net.serve_tcp(topo, net.pod_b, 8080)  # type: ignore[arg-type]
    dp = datapath()
    net.traffic(net.pod_a, "tcp-send", NODE_A4, 30080, 200_000)
    settle()
    snap = dp.snapshot()
    hop = flow(snap, key(net.node_b4, net.b4, TCP, dport=8080, origin=ORIGIN_SNAT))
    assert (hop.bytes, hop.packets) == net.nft_counter("hop") and hop.bytes > 200_000
    # Nothing else of the hop's packets: the outside client's address is on no flow to the backend.
    assert not [k for k in snap.flows if k.dst == ipaddress.ip_address(net.b4).packed and k != hop_key(net)]
    # The replies, un-NATed here, keep the backend's address and port: the backend's node counted them.
    back = flow(snap, key(net.b4, net.a4, TCP, sport=8080))
    assert (back.bytes, back.packets) == net.nft_counter("back")
    got = exported(local_flows(net), snap)
    assert set(got) == {hop_key(net)}
    attrs = got[hop_key(net)]
    assert attrs[schema.SOURCE_NODE_NAME] == NODE and schema.SOURCE_POD_NAME not in attrs
    assert attrs[schema.DESTINATION_ADDRESS] == net.b4 and attrs[schema.DESTINATION_PORT] == 8080


def hop_key(net: Net) -> FlowKey:
    return key(net.node_b4, net.b4, TCP, dport=8080, origin=ORIGIN_SNAT)


def test_clusterip_dnat_counted_once_at_the_client_with_the_backend(
    net: Net, datapath: DatapathFactory, topo: object
) -> None:
    kube_proxy(
        net,
        f"ip daddr {VIP} tcp dport 80 dnat to {net.b4}:8080",
        "",
        {
            "req": f"ip saddr {net.a4} ip daddr {net.b4} tcp dport 8080",
            "resp": f"ip saddr {VIP} ip daddr {net.a4} tcp sport 80",
        },
    )
    netns.run_in(net.pod_a, ["ip", "route", "add", f"{VIP}/32", "via", NODE_A4])
    net.serve_tcp(topo, net.pod_b, 8080)  # type: ignore[arg-type]
    dp = datapath()
    net.traffic(net.pod_a, "tcp-send", VIP, 80, 100_000)
    settle()
    snap = dp.snapshot()
    req = flow(snap, key(net.a4, net.b4, TCP, dport=8080))
    assert (req.bytes, req.packets) == net.nft_counter("req")
    resp = flow(snap, key(net.b4, net.a4, TCP, sport=8080))  # un-DNATed to the VIP after the hook's NAT
    assert (resp.bytes, resp.packets) == net.nft_counter("resp")
    got = exported(local_flows(net), snap)
    assert list(got) == [key(net.a4, net.b4, TCP, dport=8080)]
    attrs = got[key(net.a4, net.b4, TCP, dport=8080)]
    assert attrs[schema.SOURCE_POD_NAME] == "client-1" and attrs[schema.DESTINATION_ADDRESS] == net.b4


# From one source port: a direct connection to B:8080, closed first (TIME_WAIT), then one to the VIP:80.
SAME_PORT_TWICE = (
    "import socket,sys\n"
    "for dst, port in ((sys.argv[1], 8080), (sys.argv[2], 80)):\n"
    "    s = socket.socket(socket.AF_INET6 if ':' in dst else socket.AF_INET, socket.SOCK_STREAM)\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('', 40404))\n"
    "    s.connect((dst, port)); s.sendall(b'c' * 5000); s.shutdown(socket.SHUT_WR); s.recv(1); s.close()"
)


@pytest.mark.parametrize("family", [4, 6])
def test_clusterip_dnat_whose_port_conntrack_remapped_is_still_the_pods(
    net: Net, datapath: DatapathFactory, topo: object, family: int
) -> None:
    """A pod's connection to a VIP whose DNATed reply tuple an earlier connection of the pod still holds
    (its direct connection to the same backend port from the same port, in TIME_WAIT): conntrack gives it
    another source port (IPS_SRC_NAT with the pod's address). Not a masquerade, not the NodePort hop:
    the pod's, under the same flow as its direct connection (the flake of issue 10's e2e DNAT test)."""
    a, b, vip, ip, gw = (
        (net.a4, net.b4, VIP, "ip", NODE_A4) if family == 4 else (net.a6, net.b6, VIP6, "ip6", "fd77:1::1")
    )
    to = f"{b}:8080" if family == 4 else f"[{b}]:8080"
    kube_proxy(
        net,
        f"{ip} daddr {vip} tcp dport 80 dnat {ip} to {to}",
        "",
        {
            "req": f"{ip} saddr {a} {ip} daddr {b} tcp dport 8080",
            "remapped": f"{ip} saddr {a} {ip} daddr {b} ct direction original ct status snat",
        },
        table="inet",
    )
    netns.run_in(net.pod_a, ["ip", "route", "add", f"{vip}/{32 if family == 4 else 128}", "via", gw])
    net.serve_tcp(topo, net.pod_b, 8080)  # type: ignore[arg-type]
    dp = datapath()
    netns.run_in(net.pod_a, ["python3", "-c", SAME_PORT_TWICE, b, vip])
    settle()
    assert net.nft_counter("remapped")[1] > 0  # conntrack did give the second connection another port
    tcp = {k: c for k, c in dp.snapshot().flows.items() if k.proto == TCP and k.family == family}
    req = key(a, b, TCP, dport=8080)
    assert (tcp[req].bytes, tcp[req].packets) == net.nft_counter("req") and tcp[req].bytes > 10_000
    assert not [k for k in tcp if k.origin == ORIGIN_SNAT]
    attrs = attrs_of(local_flows(net), req)
    assert attrs is not None and attrs[schema.SOURCE_POD_NAME] == "client-1"


SEND_FROM = (
    "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))\n"
    "for _ in range(5): s.sendto(b'd' * 120, (sys.argv[2], 40000))"
)


def test_the_nodes_own_answers_are_the_nodes_whatever_the_address(
    net: Net, datapath: DatapathFactory
) -> None:
    net.drop_udp_at(net.pod_a)
    for address in (DNS_LINK_LOCAL, KUBE_DNS):
        netns.run_in(net.node, ["ip", "addr", "add", f"{address}/32", "dev", "lo"])
    dp = datapath()
    for address in (DNS_LINK_LOCAL, KUBE_DNS):
        netns.run_in(net.node, ["python3", "-c", SEND_FROM, address, net.a4])
    settle()
    snap = dp.snapshot()
    local = local_flows(net)
    # Named by the node even where the agent does not list the address (NodeLocal DNS on a device the
    # agent's namespace does not show, a cilium_host-style address).
    blind = LocalFlows(NODE, index(net), interface_addresses=lambda: frozenset({"127.0.0.1"}))
    blind.refresh()
    for address in (DNS_LINK_LOCAL, KUBE_DNS):
        k = key(address, net.a4, UDP, sport=53, origin=ORIGIN_LOCAL)
        assert (flow(snap, k).bytes, flow(snap, k).packets) == (5 * (20 + 8 + 120), 5)
        for agent in (local, blind):
            attrs = attrs_of(agent, k)
            assert attrs is not None and attrs[schema.SOURCE_NODE_NAME] == NODE
            assert attrs[schema.DESTINATION_POD_NAME] == "client-1"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_a_reply_an_un_nat_gave_a_vip_source_is_not_counted_again(
    net: Net, datapath: DatapathFactory, mode: str, family: int
) -> None:
    """B's datagrams get the VIP as source in the forward chain, a stateless rewrite conntrack does not
    record. `netfilter` tells it from the conntrack tuple: REWRITTEN, never exported. `cgroup` sees them
    at B's socket, before the rewrite: B's, counted at its source. `tc` hooks the uplinks (B's side here),
    not the client pod's veth the rewritten packets leave by: not seen (docs/datapaths.md)."""
    b, a, vip, ip = (net.b4, net.a4, VIP, "ip") if family == 4 else (net.b6, net.a6, VIP6, "ip6")
    net.drop_udp_at(net.pod_a)
    netns.run_in(net.node, ["ip", "addr", "add", f"{vip}/{32 if family == 4 else 128}", "dev", "lo"])
    # kube-proxy's masquerade rule makes the node track connections, as every Service-proxying node does
    # (an empty nat chain does not: conntrack starts with the first rule that needs it).
    net.nft(f"""
        table inet koipvs {{
            chain post {{
                type nat hook postrouting priority srcnat; policy accept;
                meta mark & 0x4000 == 0x4000 masquerade
            }}
            chain kofwd {{
                type filter hook forward priority 0; policy accept;
                {ip} saddr {b} udp sport 9053 {ip} saddr set {vip}
            }}
        }}""")
    dp = datapath(tc_devices=(NODE_DEVICES[1],))
    net.traffic(net.pod_b, "udp", a, 40000, 4, 80, 9053)
    settle()
    udp = {k: c for k, c in dp.snapshot().flows.items() if k.proto == UDP and k.family == family}
    if mode == "netfilter":
        k = key(vip, a, UDP, sport=9053, origin=ORIGIN_REWRITTEN)
        assert list(udp) == [k] and udp[k].packets == 4
        assert attrs_of(local_flows(net, vip), k) is None  # the backend's node counted it at its source
    elif mode == "cgroup":
        k = key(b, a, UDP, sport=9053)
        assert list(udp) == [k] and udp[k].packets == 4
        assert attrs_of(local_flows(net, vip), k) is None
    else:
        assert not udp
