"""Ground truth for the end-to-end tests: nftables counters, independent of the eBPF datapath.

Counted per (source, destination, protocol), in nftables dynamic sets with a counter per element; the
counter's bytes are the IP packet lengths, the same definition as DESIGN §3. Counting at the sender, not
at a node, is what makes "each packet counted once" testable:

- each pod namespace counts what it sends (postrouting);
- each node namespace counts what it originates itself (output: host network, NodeLocal DNS answers);
- where the pod's destination is a cluster IP, kube-proxy's DNAT on the pod's node decides the endpoint:
  that node counts the pod's forwarded packets of DNATed connections (forward hook, after DNAT, before any
  source NAT) under the endpoint's address, and those replace the pod's own (pod, cluster IP) counts (whose
  sums they must equal, or the bed is broken);
- a connection that a node both DNATs and masquerades (a NodePort, `externalTrafficPolicy: Cluster`) is
  counted by that node after the masquerade (postrouting, after source NAT, its source now the node's), as
  (node, endpoint): the hop DESIGN §3 makes the node's.

nftables counts socket buffers, the datapath what leaves (DESIGN §3: a GSO super-packet is its segments).
So every sender here sends segments: each counting point's devices get `gso_max_segs 1`, which makes TCP
build one-segment buffers (it sizes them by the route device's limit). GSO itself is proven against a
receiver-side oracle in tests/kernel (test_datapath.py's TCP test, test_datapath_wire.py).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass

from otel_kzt.demo.cluster import Cluster
from otel_kzt.netns import NetnsError, ns_argv

TABLE = "kz_truth"
Pair = tuple[str, str, str]  # (source, destination, transport) as text


@dataclass(frozen=True)
class Point:
    name: str  # chain and set prefix
    hook: str
    priority: int
    match: str  # nft match ahead of the set update ("" = every packet)


SENT = Point("sent", "postrouting", -300, "")
OWN = Point("own", "output", -300, "")
DNATED = Point("svc", "forward", -300, 'iifname "vp*" ct direction original ct status dnat')
# Masqueraded: the source now one of the node's own addresses. The SNAT bit alone is not enough: conntrack
# also sets it when it gives a pod's DNATed connection another source port (its reply tuple still held by
# the pod's earlier connection to the same backend port from the same port, in TIME_WAIT); that one keeps
# the pod's address and is the pod's, counted at DNATED.
NODEPORT = Point("hop", "postrouting", 300,
                 "ct direction original ct status & (snat | dnat) == snat | dnat fib saddr type local")


def _ruleset(points: tuple[Point, ...]) -> str:
    parts = []
    for p in points:
        match = f"{p.match} " if p.match else ""
        flags = "flags dynamic; counter; size 65535;"
        parts.append(f"""    set {p.name}4 {{ type ipv4_addr . ipv4_addr . inet_proto; {flags} }}
    set {p.name}6 {{ type ipv6_addr . ipv6_addr . inet_proto; {flags} }}
    chain {p.name} {{
        type filter hook {p.hook} priority {p.priority}; policy accept;
        meta nfproto ipv4 {match}add @{p.name}4 {{ ip saddr . ip daddr . meta l4proto }}
        meta nfproto ipv6 {match}add @{p.name}6 {{ ip6 saddr . ip6 daddr . meta l4proto }}
    }}""")
    body = "\n".join(parts)
    return f"table inet {TABLE} {{\n{body}\n}}\n"


def _nft(ns: str, args: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(ns_argv(ns, ["nft", *args]), input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"nft {' '.join(args)} in {ns}: {proc.stderr.strip()}")
    return proc.stdout


def _counting_points(cluster: Cluster) -> list[tuple[str, tuple[Point, ...]]]:
    return [(p.netns, (SENT,)) for p in cluster.routed_pods()] + [
        (n.netns, (OWN, DNATED, NODEPORT)) for n in cluster.nodes]


def _one_segment_per_buffer(ns: str) -> None:
    links = json.loads(subprocess.run(ns_argv(ns, ["ip", "-j", "link", "show"]), capture_output=True,
                                      text=True, timeout=30, check=True).stdout)
    for link in links:
        if link["ifname"] != "lo":
            subprocess.run(ns_argv(ns, ["ip", "link", "set", "dev", link["ifname"], "gso_max_segs", "1"]),
                           capture_output=True, timeout=30, check=True)


def install(cluster: Cluster) -> None:
    for ns, points in _counting_points(cluster):
        _one_segment_per_buffer(ns)
        _nft(ns, ["-f", "-"], _ruleset(points))


def _read_set(ns: str, name: str, out: dict[Pair, int]) -> None:
    doc = json.loads(_nft(ns, ["-j", "list", "set", "inet", TABLE, name]))
    for entry in doc["nftables"]:
        for elem in entry.get("set", {}).get("elem", []):
            src, dst, proto = elem["elem"]["val"]["concat"]
            key = (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), str(proto))
            out[key] = out.get(key, 0) + int(elem["elem"]["counter"]["bytes"])


def read_points(cluster: Cluster) -> dict[str, dict[Pair, int]]:
    """Bytes per pair for each kind of counting point, summed over the namespaces that have it."""
    out: dict[str, dict[Pair, int]] = {}
    for ns, points in _counting_points(cluster):
        for p in points:
            for family in ("4", "6"):
                _read_set(ns, p.name + family, out.setdefault(p.name, {}))
    return out


def _is_service_ip(cluster: Cluster, address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip in ipaddress.ip_network(cluster.plan.service_cidr(ip.version))


def read(cluster: Cluster) -> dict[Pair, int]:
    """Bytes per (source, destination, transport) as DESIGN §3 attributes them (module docstring)."""
    return read_checked(cluster)[0]


def read_checked(cluster: Cluster) -> tuple[dict[Pair, int], str | None]:
    """`read`, and what is inconsistent in the counters (None: nothing). While traffic flows the pods'
    and their nodes' counters are read a moment apart; once it is quiet they must agree."""
    points = read_points(cluster)
    out: dict[Pair, int] = {}
    to_service: dict[tuple[str, str, int], int] = {}  # (source, transport, family) -> bytes to cluster IPs
    for pair, value in points["sent"].items():
        if _is_service_ip(cluster, pair[1]):
            if pair[2] == "tcp":  # DNS to the kube-dns cluster IP is answered on the node (NOTRACK)
                key = (pair[0], pair[2], ipaddress.ip_address(pair[0]).version)
                to_service[key] = to_service.get(key, 0) + value
            continue
        out[pair] = out.get(pair, 0) + value
    dnated: dict[tuple[str, str, int], int] = {}
    for pair, value in points["svc"].items():
        key = (pair[0], pair[2], ipaddress.ip_address(pair[0]).version)
        dnated[key] = dnated.get(key, 0) + value
        out[pair] = out.get(pair, 0) + value
    problem = None
    if to_service != dnated:
        problem = f"pods' bytes to cluster IPs {to_service} != their nodes' DNATed {dnated}"
    for pair, value in [*points["own"].items(), *points["hop"].items()]:
        out[pair] = out.get(pair, 0) + value
    return out, problem
