"""Ground truth for the end-to-end tests: nftables counters, independent of the eBPF datapath.

Each pod namespace counts what it sends (postrouting) and each node namespace what it originates itself
(output: host-network traffic), per (source, destination, protocol), in an nftables dynamic set with a
counter per element. The counter's bytes are the IP packet lengths, the same definition as DESIGN §3.
Counting at the sender, not at a node, is what makes "each packet counted once" testable.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

from otel_kzt.demo.cluster import Cluster
from otel_kzt.netns import NetnsError, ns_argv

TABLE = "kz_truth"
Pair = tuple[str, str, str]  # (source, destination, transport) as text


def _ruleset(hook: str) -> str:
    return f"""table inet {TABLE} {{
    set f4 {{ type ipv4_addr . ipv4_addr . inet_proto; flags dynamic; counter; size 65535; }}
    set f6 {{ type ipv6_addr . ipv6_addr . inet_proto; flags dynamic; counter; size 65535; }}
    chain count {{
        type filter hook {hook} priority -300; policy accept;
        meta nfproto ipv4 add @f4 {{ ip saddr . ip daddr . meta l4proto }}
        meta nfproto ipv6 add @f6 {{ ip6 saddr . ip6 daddr . meta l4proto }}
    }}
}}
"""


def _nft(ns: str, args: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(ns_argv(ns, ["nft", *args]), input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"nft {' '.join(args)} in {ns}: {proc.stderr.strip()}")
    return proc.stdout


def _counting_points(cluster: Cluster) -> list[tuple[str, str]]:
    return [(p.netns, "postrouting") for p in cluster.routed_pods()] + [
        (n.netns, "output") for n in cluster.nodes]


def install(cluster: Cluster) -> None:
    for ns, hook in _counting_points(cluster):
        _nft(ns, ["-f", "-"], _ruleset(hook))


def read(cluster: Cluster) -> dict[Pair, int]:
    """Bytes per (source, destination, transport), summed over every counting point."""
    out: dict[Pair, int] = {}
    for ns, _hook in _counting_points(cluster):
        for name in ("f4", "f6"):
            doc = json.loads(_nft(ns, ["-j", "list", "set", "inet", TABLE, name]))
            for entry in doc["nftables"]:
                for elem in entry.get("set", {}).get("elem", []):
                    src, dst, proto = elem["elem"]["val"]["concat"]
                    key = (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), str(proto))
                    out[key] = out.get(key, 0) + int(elem["elem"]["counter"]["bytes"])
    return out
