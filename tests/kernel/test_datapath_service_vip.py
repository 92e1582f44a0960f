"""Service VIPs on the kernel (DESIGN §3a): pod A connects to a ClusterIP that kube-proxy-style nftables
DNAT in the node sends on to pod B, the Service's endpoint (on "another node" in the metadata).

- `cgroup` counts at pod A's socket, before the DNAT: the flow's destination is the VIP; the enricher
  names it by its Service and classes it `unknown` (the backend's zone is not known there), and the
  agent's `kzt_agent_service_vip_bytes_total` equals its bytes;
- `netfilter` and `tc` count after the DNAT: the flow goes to pod B, named by pod and Service, and no byte
  is a VIP's.

The oracle, in every mode, is what pod B receives (nftables in its prerouting, one segment per buffer).
The metadata comes from the RBAC-enforcing test API server, as deployed: the agent's side (naming, VIP
bytes) lists and watches it node-scoped with the agent's ServiceAccount token, the enricher's side
(resolution) cluster-wide with the enricher's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from otel_kzt import netns, schema
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.vipbytes import ServiceVipBytes
from otel_kzt.enricher.processing.resolution import Resolver
from otel_kzt.k8s import open_metadata
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.schema import TrafficClass
from tests.kernel.conftest import MODES, DatapathFactory, Net, settle
from tests.kernel.test_datapath import TCP, flow, key
from tests.support.k8s_cluster import AGENT, ENRICHER, ServedCluster
from tests.support.k8s_objects import fresh, make_node, make_pod
from tests.support.service_fixtures import slice_for
from tests.unit.test_agent_local import attrs_of

pytestmark = [pytest.mark.kernel, pytest.mark.parametrize("mode", MODES, indirect=True)]

NODE, OTHER = "kd-node", "kd-other"
VIP = {4: "172.20.41.17", 6: "fd00:20::11"}  # shop/checkout, dual-stack
PORT, TARGET = 80, 8080


@pytest.fixture
def metadata(net: Net, served_cluster: ServedCluster) -> Iterator[tuple[ClusterIndex, ClusterIndex]]:
    """(the agent's index, the enricher's): pod A on this node (zone z1), pod B checkout's endpoint on
    another node (zone z2)."""
    service = fresh("service-clusterip")
    service["spec"].update(clusterIPs=[VIP[4], VIP[6]], ipFamilies=["IPv4", "IPv6"])
    slice6 = slice_for("checkout", "shop", [(net.b6, "z2")], TARGET)
    slice6["metadata"]["name"], slice6["addressType"] = "checkout-v6", "IPv6"
    served_cluster.sync([
        make_node(NODE, ["10.77.1.1", net.node_b4], zone="z1"),
        make_node(OTHER, ["10.77.9.9"], zone="z2"),
        make_pod("client-1", NODE, [net.a4, net.a6]),
        make_pod("checkout-1", OTHER, [net.b4, net.b6]),
        service,
        slice_for("checkout", "shop", [(net.b4, "z2")], TARGET),
        slice6,
    ])  # fmt: skip
    # The agent lists Services only in cgroup mode (VIP bytes); here in every mode, so that "no byte is a
    # VIP's" after the DNAT is checked against VIPs it knows.
    as_agent, as_enricher = (str(served_cluster.kubeconfig(a, via="127.0.0.1")) for a in (AGENT, ENRICHER))
    agent = open_metadata(None, node_name=NODE, kubeconfig=as_agent, service_vips=True)
    enricher = open_metadata(None, kubeconfig=as_enricher)
    with agent, enricher:
        deadline = time.monotonic() + 20
        while not all(h.index.ready() and h.index.services.available() for h in (agent, enricher)):
            assert time.monotonic() < deadline, f"metadata not synced: {agent.status()} {enricher.status()}"
            time.sleep(0.05)
        yield agent.index, enricher.index


def kube_proxy(net: Net) -> None:
    """The ClusterIP's DNAT in the node, both families (kube-proxy's nftables mode does the same)."""
    net.nft(f"""
        table inet konat {{
            chain pre {{
                type nat hook prerouting priority dstnat; policy accept;
                ip daddr {VIP[4]} tcp dport {PORT} dnat ip to {net.b4}:{TARGET}
                ip6 daddr {VIP[6]} tcp dport {PORT} dnat ip6 to [{net.b6}]:{TARGET}
            }}
        }}""")


@pytest.mark.parametrize("family", [4, 6])
def test_a_connection_to_a_service_vip(
    net: Net,
    datapath: DatapathFactory,
    topo: netns.Topology,
    metadata: tuple[ClusterIndex, ClusterIndex],
    *,
    mode: str,
    family: int,
) -> None:
    src, backend = (net.a4, net.b4) if family == 4 else (net.a6, net.b6)
    vip = VIP[family]
    kube_proxy(net)
    net.one_segment_per_buffer()
    net.count_received(net.pod_b, src, backend, match=f"tcp dport {TARGET}", name="kdwire")
    net.serve_tcp(topo, net.pod_b, TARGET)
    index, enricher_index = metadata
    dp = datapath()
    vips = ServiceVipBytes(index.services, time.time_ns())
    vips.observe(dp.snapshot())
    net.traffic(net.pod_a, "tcp-send", vip, PORT, 300_000)
    settle()
    snap = dp.snapshot()
    wire = net.nft_counter("kdwire", ns=net.pod_b)
    assert wire[0] > 300_000
    to_vip, to_backend = key(src, vip, TCP, dport=PORT), key(src, backend, TCP, dport=TARGET)
    local = LocalFlows(NODE, index, interface_addresses=frozenset)
    local.refresh()
    if mode == "cgroup":  # the socket's view: what it addressed
        got = flow(snap, to_vip)
        assert to_backend not in snap.flows
        assert vips.observe(snap) == got.bytes == wire[0] and got.packets == wire[1]
    else:  # after the DNAT: the backend, and nothing to a VIP
        got = flow(snap, to_backend)
        assert not [k for k in snap.flows if k.dst == to_vip.dst]
        assert vips.observe(snap) == 0 and (got.bytes, got.packets) == wire
    exported = attrs_of(local, to_vip if mode == "cgroup" else to_backend)
    assert exported is not None and exported[schema.SOURCE_POD_NAME] == "client-1"
    given = {k: str(v) for k, v in exported.items()}
    resolved = Resolver(enricher_index).resolve(given, True)
    attrs = resolved.attrs
    assert (attrs[schema.DESTINATION_SERVICE_NAMESPACE], attrs[schema.DESTINATION_SERVICE_NAME]) == (
        "shop",
        "checkout",
    )
    if mode == "cgroup":
        assert resolved.traffic_class is TrafficClass.UNKNOWN
        assert attrs[schema.DESTINATION_ADDRESS] == vip and schema.DESTINATION_POD_NAME not in attrs
    else:
        assert resolved.traffic_class is TrafficClass.CROSS_ZONE
        assert attrs[schema.DESTINATION_POD_NAME] == "checkout-1"
