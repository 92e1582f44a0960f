"""kube-proxy for the simulated cluster: each node DNATs Service cluster IPs to endpoints, in nftables.

Built from the same Service and EndpointSlice objects the metadata file holds (API-shaped dicts), the way
kube-proxy's nftables mode does it: in the node's namespace, at `prerouting` (pods' packets) and `output`
(the node's own), a cluster IP and port jumps to a chain that picks one endpoint at random
(`numgen random`) and DNATs to its address and target port. The agent's POSTROUTING hook then sees the
pod it goes to, as on a real node. Which endpoints a node uses is kube-proxy's topology rule:

- ready endpoints; none ready: the serving ones that are terminating (kube-proxy keeps those serving);
- when every one of them carries zone hints and one is hinted for this node's zone: only those hinted for
  it (`PreferSameNode`: node hints first, the same way); otherwise all of them.

Each node's rules live in one table that `sync` replaces atomically (one `nft -f` transaction), so a
Service re-routed mid-run never has a moment without rules. Not simulated: NodePort, external IPs,
session affinity, hairpin masquerade (the story has no pod calling its own Service).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from otel_kzt import schema
from otel_kzt.demo.cluster import Cluster, NodeSpec
from otel_kzt.demo.topology import nft
from otel_kzt.netns import Topology, netns_exists

log = logging.getLogger(__name__)

TABLE: Final = "kzt_kubeproxy"
Obj = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Rule:
    """One cluster IP and port of a Service and the endpoints this node sends it to."""

    family: int
    cluster_ip: str
    port: int
    protocol: str  # "tcp", "udp", "sctp"
    targets: tuple[tuple[str, int], ...]  # (address, target port)


def _ready(endpoint: Obj) -> bool:
    return endpoint.get("conditions", {}).get("ready") is not False  # absent: ready (API semantics)


def _pick(endpoints: Sequence[Obj], node: NodeSpec) -> list[Obj]:
    """kube-proxy's topology rule for one node (see the module docstring)."""
    usable = [e for e in endpoints if _ready(e)]
    if not usable:
        usable = [e for e in endpoints if e.get("conditions", {}).get("serving") and
                  e.get("conditions", {}).get("terminating")]  # fmt: skip
    for kind, mine in (("forNodes", node.name), ("forZones", node.zone)):
        hinted = [e for e in usable if e.get("hints", {}).get(kind)]
        if usable and len(hinted) == len(usable):
            local = [e for e in usable if mine in {h.get("name") for h in e["hints"][kind]}]
            if local:
                return local
    return usable


def _slices(items: Sequence[Obj]) -> dict[tuple[str, str], list[Obj]]:
    """EndpointSlices by the (namespace, name) of the Service they serve."""
    out: dict[tuple[str, str], list[Obj]] = {}
    for item in items:
        if item.get("kind") == "EndpointSlice":
            meta = item["metadata"]
            service = meta.get("labels", {}).get(schema.LABEL_SERVICE_NAME)
            if service:
                out.setdefault((meta["namespace"], service), []).append(item)
    return out


def _targets(slices: Sequence[Obj], port_name: str, address_type: str,
             node: NodeSpec) -> list[tuple[str, int]]:  # fmt: skip
    """(address, target port) of the endpoints this node uses for one Service port and address family."""
    out = []
    for es in slices:
        ports = [p.get("port") for p in es.get("ports", []) if p.get("name", "") == port_name]
        if es.get("addressType") == address_type and ports and ports[0] is not None:
            out += [(e["addresses"][0], int(ports[0])) for e in _pick(es.get("endpoints", []), node)]
    return sorted(out)


def rules(objects: Iterable[Obj], node: NodeSpec) -> list[Rule]:
    """The DNAT rules of one node from Service and EndpointSlice objects."""
    items = list(objects)
    slices = _slices(items)
    out = []
    for svc in (i for i in items if i.get("kind") == "Service"):
        meta, spec = svc["metadata"], svc["spec"]
        mine = slices.get((meta["namespace"], meta["name"]), [])
        for ip in spec.get("clusterIPs") or []:
            if ip == "None":
                continue  # headless: DNS hands out pod addresses, kube-proxy has nothing to do
            family = ipaddress.ip_address(ip).version
            for port in spec.get("ports", []):
                targets = _targets(mine, port.get("name", ""), f"IPv{family}", node)
                out.append(Rule(family, ip, int(port["port"]), port.get("protocol", "TCP").lower(),
                                tuple(targets)))
    return out


def ruleset(node: NodeSpec, node_rules: Sequence[Rule]) -> str:
    """One nft transaction: the node's table created (if missing), emptied, and filled."""
    chains: list[str] = []
    dispatch: list[str] = []
    for i, rule in enumerate(node_rules):
        match = "ip" if rule.family == 4 else "ip6"
        if not rule.targets:
            continue  # no endpoint: nothing answers the cluster IP (kube-proxy rejects in its filter table)
        dispatch.append(f"        {match} daddr {rule.cluster_ip} {rule.protocol} dport {rule.port} "
                        f"jump svc{i}")
        jumps = []
        for j, (address, port) in enumerate(rule.targets):
            to = f"{address}:{port}" if rule.family == 4 else f"[{address}]:{port}"
            dnat = f"meta l4proto {rule.protocol} dnat {match} to {to}"
            chains.append(f"    chain svc{i}ep{j} {{\n        {dnat}\n    }}")
            jumps.append(f"{j} : jump svc{i}ep{j}")
        chains.append(f"    chain svc{i} {{\n        numgen random mod {len(rule.targets)} vmap "
                      f"{{ {', '.join(jumps)} }}\n    }}")
    body = "\n".join(chains)
    services = "\n".join(dispatch)
    return f"""table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    chain services {{
{services}
    }}
{body}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump services
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
}}
"""


def sync(node: NodeSpec, objects: Iterable[Obj]) -> list[Rule]:
    """(Re)write one node's Service rules from the objects; returns what it installed."""
    node_rules = rules(objects, node)
    nft(node.netns, ruleset(node, node_rules))
    log.debug("kube-proxy rules node=%s services=%d", node.name, len(node_rules))
    return node_rules


def sync_all(cluster: Cluster, objects: Sequence[Obj]) -> None:
    for node in cluster.nodes:
        sync(node, objects)


def install(cluster: Cluster, objects: Sequence[Obj], topo: Topology) -> None:
    """Rules on every node now; `topo.close()` removes them (the node namespaces take them along too)."""
    for node in cluster.nodes:
        sync(node, objects)
        topo.on_close(f"kube-proxy table in {node.netns}", functools.partial(_remove, node.netns))


def _remove(netns: str) -> None:
    if netns_exists(netns):
        nft(netns, f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
