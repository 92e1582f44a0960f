"""What real clusters add to the demo's topology, for the end-to-end proof (issue 10).

On top of the demo's cluster (topology.py) and its kube-proxy (kubeproxy.py, which DNATs every cluster IP
on every node from the same Service objects the API server serves):

- `shop/catalog`, a ClusterIP Service whose endpoints sit on two nodes in two zones (port 80 -> the pods'
  test port), reached by the pods through kube-proxy's DNAT;
- one node in IPVS style: every cluster IP on a `kube-ipvs0` device (a veth end stands in for the dummy),
  and replies un-NATed in the forward chain, before POSTROUTING, as IPVS does (a stateless rewrite of the
  source back to the cluster IP and port), so that node's POSTROUTING sees a forwarded packet whose source
  is one of its own addresses;
- NodeLocal DNS on every node: 169.254.20.10 (and, on the iptables-mode nodes, the kube-dns cluster IP) on
  a `nodelocaldns` device, NOTRACK rules as node-local-dns installs them, a DNS server answering Service
  names (dns.py);
- `shop/storefront`, `type: NodePort`, `externalTrafficPolicy: Cluster`, its one endpoint in the zone the
  entry node is not in: kube-proxy's NodePort rules on every node (mark, DNAT to the endpoint, masquerade
  the marked packets), reached from the internet namespace at the entry node's address.

Everything lives in the node namespaces the demo's `Topology` removes (tables and devices go with them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from otel_kzt.demo import kubeproxy
from otel_kzt.demo.cluster import Cluster, NodeSpec, PodSpec
from otel_kzt.demo.services import ServicePortSpec, ServiceSpec, cluster_ips
from otel_kzt.demo.topology import nft
from otel_kzt.netns import add_address, ip
from otel_kzt.schema import LABEL_SERVICE_NAME

NODELOCAL_DNS = "169.254.20.10"
SERVICE_PORT = 80
NODE_PORT = 30080
MASQ_MARK = 0x4000  # kube-proxy's KUBE-MARK-MASQ bit
IPVS_DEVICE = "kube-ipvs0"
DNS_DEVICE = "nodelocaldns"
CATALOG_VIP, STOREFRONT_VIP, KUBE_DNS_VIP = 20, 21, 22  # cluster IP numbers in the address plan


@dataclass(frozen=True)
class RealCluster:
    catalog: ServiceSpec
    storefront: ServiceSpec
    kube_dns: ServiceSpec
    ipvs_node: NodeSpec
    entry_node: NodeSpec  # the node the internet's NodePort connections land on

    @property
    def services(self) -> tuple[ServiceSpec, ...]:
        return (self.catalog, self.storefront, self.kube_dns)

    def dns_addresses(self, cluster: Cluster, node: NodeSpec) -> tuple[str, ...]:
        """Where node-local-dns listens on `node`: the link-local address, and the kube-dns cluster IP in
        iptables mode (in IPVS mode that address is IPVS's, and pods are pointed at 169.254.20.10)."""
        if node.name == self.ipvs_node.name:
            return (NODELOCAL_DNS,)
        return (NODELOCAL_DNS, self.kube_dns_ip(cluster))

    def kube_dns_ip(self, cluster: Cluster) -> str:
        return cluster.plan.service_ip(KUBE_DNS_VIP, 4)

    def records(self, cluster: Cluster) -> dict[str, tuple[str, ...]]:
        """The names the cluster DNS answers: each Service's cluster IPs."""
        out: dict[str, tuple[str, ...]] = {}
        for spec in (self.catalog, self.storefront):
            ips = cluster_ips(cluster, spec)
            assert ips is not None
            out[f"{spec.name}.{spec.namespace}.svc.cluster.local"] = ips
        return out


def plan(cluster: Cluster, test_port: int) -> RealCluster:
    """Pick the shapes' pods and nodes on the demo's 2 zones x 2 nodes (needs both api replicas); the
    Services' endpoints listen on `test_port`."""
    api = [p for p in cluster.routed_pods() if p.workload_name == "api"]
    if len(api) < 2 or api[0].node.zone == api[1].node.zone:
        raise ValueError("the catalog Service needs the story's two api pods in two zones")
    entry = cluster.nodes[0]
    remote: PodSpec = next(p for p in cluster.routed_pods() if p.node.zone != entry.zone)
    ipvs_node = next(n for n in reversed(cluster.nodes) if n.zone != entry.zone)
    return RealCluster(
        catalog=ServiceSpec("shop", "catalog", tuple(api),
                            (ServicePortSpec("http", SERVICE_PORT, test_port),), vip_index=CATALOG_VIP),
        storefront=ServiceSpec("shop", "storefront", (remote,),
                               (ServicePortSpec("http", SERVICE_PORT, test_port),), vip_index=STOREFRONT_VIP),
        kube_dns=ServiceSpec("kube-system", "kube-dns", (), (ServicePortSpec("dns", 53, 53, "UDP"),),
                             vip_index=KUBE_DNS_VIP),
        ipvs_node=ipvs_node, entry_node=entry)


def service_object(real: RealCluster, obj: dict[str, Any]) -> dict[str, Any]:
    """The API's view of the storefront: `type: NodePort`, its nodePort, `externalTrafficPolicy: Cluster`."""
    meta = obj["metadata"]
    if obj["kind"] != "Service" or (meta["namespace"], meta["name"]) != ("shop", "storefront"):
        return obj
    out = copy.deepcopy(obj)
    out["spec"]["type"] = "NodePort"
    out["spec"]["externalTrafficPolicy"] = "Cluster"
    for port in out["spec"]["ports"]:
        port["nodePort"] = NODE_PORT
    return out


def _stand_in(ns: str, name: str, peer: str, addresses: tuple[str, ...]) -> None:
    """A device holding local addresses (no dummy devices here: a veth pair, both ends in `ns`)."""
    ip(ns, "link", "add", name, "type", "veth", "peer", "name", peer)
    ip(ns, "link", "set", name, "up")
    ip(ns, "link", "set", peer, "up")
    for address in addresses:
        add_address(ns, name, f"{address}/{128 if ':' in address else 32}")


def _set(addresses: tuple[str, ...]) -> str:
    return "{ " + ", ".join(addresses) + " }"


def nodelocal_dns_rules(addresses: tuple[str, ...]) -> str:
    """node-local-dns's NOTRACK rules: its queries and answers bypass conntrack (and kube-proxy's DNAT)."""
    dst = _set(addresses)
    return f"""table inet kz_nodelocaldns {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        ip daddr {dst} udp dport 53 notrack
        ip daddr {dst} tcp dport 53 notrack
    }}
    chain output {{
        type filter hook output priority raw; policy accept;
        ip saddr {dst} udp sport 53 notrack
        ip saddr {dst} tcp sport 53 notrack
        ip daddr {dst} udp dport 53 notrack
    }}
}}
"""


def ipvs_rules(vips: list[tuple[str, int]]) -> str:
    """IPVS's un-NAT of replies in the forward path: source back to (cluster IP, port) before POSTROUTING."""
    lines = []
    for vip, port in vips:
        match = "ip6" if ":" in vip else "ip"
        lines.append(f"        ct direction reply ct status dnat ct original {match} daddr {vip} "
                     f"meta l4proto tcp {match} saddr set {vip} tcp sport set {port}")
    body = "\n".join(lines)
    return f"""table inet kz_ipvs {{
    chain forward {{
        type filter hook forward priority -150; policy accept;
{body}
    }}
}}
"""


def nodeport_rules(node_rules: list[kubeproxy.Rule]) -> str:
    """kube-proxy's NodePort path: a connection to any local address at the nodePort is marked for
    masquerade and DNATed to an endpoint (any zone: externalTrafficPolicy Cluster)."""
    dispatch, chains = [], []
    for i, rule in enumerate(r for r in node_rules if r.targets):
        match, nfproto = ("ip", "ipv4") if rule.family == 4 else ("ip6", "ipv6")
        dispatch.append(f"        meta nfproto {nfproto} fib daddr type local tcp dport {NODE_PORT} "
                        f"meta mark set meta mark | {MASQ_MARK:#x} jump np{i}")
        jumps = []
        for j, (address, port) in enumerate(rule.targets):
            to = f"{address}:{port}" if rule.family == 4 else f"[{address}]:{port}"
            chains.append(f"    chain np{i}ep{j} {{\n        meta l4proto tcp dnat {match} to {to}\n    }}")
            jumps.append(f"{j} : jump np{i}ep{j}")
        chains.append(f"    chain np{i} {{\n        numgen random mod {len(rule.targets)} vmap "
                      f"{{ {', '.join(jumps)} }}\n    }}")
    return f"""table inet kz_nodeport {{
    chain prerouting {{
        type nat hook prerouting priority dstnat - 10; policy accept;
{chr(10).join(dispatch)}
    }}
{chr(10).join(chains)}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade
    }}
}}
"""


def _of(objects: list[dict[str, Any]], spec: ServiceSpec) -> list[dict[str, Any]]:
    """The Service `spec` and its EndpointSlices among `objects`."""
    def mine(obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        name = meta["name"] if obj["kind"] == "Service" else meta.get("labels", {}).get(LABEL_SERVICE_NAME)
        return (meta.get("namespace"), name) == (spec.namespace, spec.name)

    return [o for o in objects if mine(o)]


def install(cluster: Cluster, real: RealCluster, objects: list[dict[str, Any]]) -> None:
    """Every shape on every node (the namespaces take it all along when the topology goes); `objects`: the
    Services and EndpointSlices as the API server serves them."""
    storefront = _of(objects, real.storefront)
    for node in cluster.nodes:
        addresses = real.dns_addresses(cluster, node)
        _stand_in(node.netns, DNS_DEVICE, "nldns-peer", addresses)
        nft(node.netns, nodelocal_dns_rules(addresses))
        nft(node.netns, nodeport_rules(kubeproxy.rules(storefront, node)))
    # IPVS holds every cluster IP on its device and un-NATs the replies of every TCP port.
    services = [o["spec"] for o in objects if o["kind"] == "Service"]
    all_ips = tuple(a for s in services for a in s.get("clusterIPs", []) if a != "None")
    vips = [(a, p["port"]) for s in services for a in s.get("clusterIPs", []) if a != "None"
            for p in s["ports"] if p.get("protocol", "TCP") == "TCP"]
    _stand_in(real.ipvs_node.netns, IPVS_DEVICE, "ipvs0-peer", all_ips)
    nft(real.ipvs_node.netns, ipvs_rules(vips))
