"""Which network devices the `tc` datapath hooks: the ones traffic leaves the node by.

`--tc-devices` names them (shell patterns allowed: `eth*,ens*`; parsed by agent/config.py). By
default a device is hooked when it is up, not loopback, and

- carries a route with a gateway, or a default route, in any routing table (the uplink; on EKS also the
  secondary ENIs, whose default routes live in per-ENI policy-routing tables), or
- holds one of the node's own addresses (the Node object's InternalIP/ExternalIP), or
- is an overlay device (VXLAN, Geneve, WireGuard, IP-in-IP, GRE): its egress sees the inner packets with
  the pods' own addresses, before encapsulation.

Pod-facing devices (a pod's veth, a CNI bridge) only carry direct routes to pods, so they are not picked:
what leaves through them stays on the node, which `tc` mode does not see by design (same-node traffic).
The choice is read from `ip -j` output (iproute2 is in the agent image anyway), so it is a pure function
of three JSON documents and unit-tested on recorded ones.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import subprocess
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from otel_kzt.errors import DatapathError

log = logging.getLogger(__name__)

VXLAN_DEFAULT_PORT = 8472  # the kernel's, for a VXLAN device made without `dstport`
OVERLAY_KINDS = frozenset(
    {"vxlan", "geneve", "wireguard", "ipip", "sit", "gre", "gretap", "ip6gre", "ip6tnl"}
)


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    ifindex: int
    kind: str  # linkinfo kind ("vxlan", "veth" ...), "" for physical devices
    reason: str  # why it is hooked: "explicit", "route", "node-address", "overlay"
    ether: bool = False  # an Ethernet link header (`link_type` "ether"): the tc program may read past it
    port: int = 0  # a VXLAN device's UDP destination port (Linux's default 8472 when not shown); else 0

    @property
    def overlay(self) -> bool:
        return self.kind in OVERLAY_KINDS


def choose(
    links: Iterable[Mapping[str, Any]],
    addresses: Iterable[Mapping[str, Any]],
    routes: Iterable[Mapping[str, Any]],
    *,
    patterns: Sequence[str] = (),
    node_addresses: Collection[str] = (),
) -> list[Device]:
    """The devices to hook, in ifindex order, from `ip -j -d link`, `ip -j addr` and `ip -j route`."""
    by_name = {str(link["ifname"]): link for link in links if "ifname" in link}
    candidates = {name: link for name, link in by_name.items() if _usable(link)}
    if patterns:
        chosen = {n: "explicit" for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    else:
        chosen = _default_choice(candidates, addresses, routes, node_addresses)
    devices = [
        Device(
            name,
            int(candidates[name]["ifindex"]),
            _kind(candidates[name]),
            reason,
            candidates[name].get("link_type") == "ether",
            _vxlan_port(candidates[name]),
        )
        for name, reason in chosen.items()
    ]
    return sorted(devices, key=lambda d: d.ifindex)


def _default_choice(
    candidates: Mapping[str, Mapping[str, Any]],
    addresses: Iterable[Mapping[str, Any]],
    routes: Iterable[Mapping[str, Any]],
    node_addresses: Collection[str],
) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for name in _route_devices(routes):
        if name in candidates:
            chosen.setdefault(name, "route")
    wanted = {_normalize(a) for a in node_addresses}
    for entry in addresses:
        name = str(entry.get("ifname", ""))
        held = {_normalize(str(a["local"])) for a in entry.get("addr_info", ()) if "local" in a}
        if name in candidates and held & wanted:
            chosen.setdefault(name, "node-address")
    for name, link in candidates.items():
        if _kind(link) in OVERLAY_KINDS:
            chosen.setdefault(name, "overlay")
    return chosen


def _route_devices(routes: Iterable[Mapping[str, Any]]) -> list[str]:
    """Devices of routes that lead off the node: a default route, or any route through a gateway."""
    names: list[str] = []
    for route in routes:
        if route.get("type", "unicast") != "unicast":
            continue  # local, broadcast, blackhole ... never leave by a device
        hops = route.get("nexthops") or [route]
        for hop in hops:
            dev = hop.get("dev")
            if dev and (route.get("dst") == "default" or hop.get("gateway") or hop.get("via")):
                names.append(str(dev))
    return names


def _usable(link: Mapping[str, Any]) -> bool:
    flags = link.get("flags", ())
    return "UP" in flags and "LOOPBACK" not in flags and link.get("link_type") != "loopback"


def _kind(link: Mapping[str, Any]) -> str:
    info = link.get("linkinfo") or {}
    return str(info.get("info_kind", ""))


def _vxlan_port(link: Mapping[str, Any]) -> int:
    if _kind(link) != "vxlan":
        return 0
    data = (link.get("linkinfo") or {}).get("info_data") or {}
    return int(data.get("port") or VXLAN_DEFAULT_PORT)


def _normalize(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _ip_json(*args: str) -> list[dict[str, Any]]:
    try:
        out = subprocess.run(
            ["ip", "-j", *args], check=True, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DatapathError(f"cannot list network devices (ip -j {' '.join(args)}): {exc}") from exc
    result = json.loads(out or "[]")
    return result if isinstance(result, list) else []


def discover(patterns: Sequence[str] = (), node_addresses: Collection[str] = ()) -> list[Device]:
    """`choose` on this network namespace, as it is now."""
    links = _ip_json("-d", "link", "show")
    addresses = _ip_json("addr", "show")
    routes = _ip_json("-4", "route", "show", "table", "all") + _ip_json("-6", "route", "show", "table", "all")
    return choose(links, addresses, routes, patterns=patterns, node_addresses=node_addresses)
