"""The tc datapath's device choice on recorded `ip -j` output: uplinks, secondary ENIs (policy routing),
node addresses, overlays; pod veths and bridges left alone; explicit patterns."""

from __future__ import annotations

from typing import Any

from otel_kzt.agent.datapath.devices import choose


def link(index: int, name: str, kind: str = "", up: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "ifindex": index,
        "ifname": name,
        "flags": ["BROADCAST", "UP", "LOWER_UP"] if up else ["BROADCAST"],
        "link_type": "ether",
    }
    if kind:
        entry["linkinfo"] = {"info_kind": kind}
    return entry


LO = {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP"], "link_type": "loopback"}

# An EKS node: eth0 primary ENI, eth1 a secondary ENI (policy routing table 2), two pod veths (eni*),
# a VXLAN device, and a down device.
EKS_LINKS = [
    LO,
    link(2, "eth0"),
    link(3, "eth1"),
    link(4, "eni1a2b", "veth"),
    link(5, "eni3c4d", "veth"),
    link(6, "vxlan.calico", "vxlan"),
    link(7, "eth2", up=False),
]
EKS_ADDRS = [
    {"ifname": "eth0", "addr_info": [{"local": "10.0.1.10"}]},
    {"ifname": "eth1", "addr_info": [{"local": "10.0.1.77"}]},
    {"ifname": "eni1a2b", "addr_info": [{"local": "fe80::1"}]},
]
EKS_ROUTES = [
    {"dst": "default", "gateway": "10.0.1.1", "dev": "eth0"},
    {"dst": "10.0.1.0/24", "dev": "eth0", "scope": "link"},
    {"dst": "default", "gateway": "10.0.1.1", "dev": "eth1", "table": "2"},
    {"dst": "10.0.1.55", "dev": "eni1a2b", "scope": "link"},
    {"dst": "10.0.1.56", "dev": "eni3c4d", "scope": "link"},
    {"type": "local", "dst": "10.0.1.10", "dev": "eth0", "table": "local"},
    {"dst": "default", "gateway": "10.0.9.1", "dev": "eth2"},
]


def names(devices: list[Any]) -> list[str]:
    return [d.name for d in devices]


def test_default_choice_takes_uplinks_secondary_enis_and_overlays_not_pods() -> None:
    devices = choose(EKS_LINKS, EKS_ADDRS, EKS_ROUTES)
    assert names(devices) == ["eth0", "eth1", "vxlan.calico"]
    assert [d.reason for d in devices] == ["route", "route", "overlay"]
    assert [d.overlay for d in devices] == [False, False, True]


def test_a_device_holding_a_node_address_is_hooked_without_a_gateway_route() -> None:
    links = [LO, link(2, "eth0", "veth"), link(3, "vp0", "veth")]
    addrs = [
        {"ifname": "eth0", "addr_info": [{"local": "10.200.0.11"}, {"local": "fd00:200::b"}]},
        {"ifname": "vp0", "addr_info": [{"local": "169.254.1.1"}]},
    ]
    routes = [{"dst": "10.200.0.0/24", "dev": "eth0", "scope": "link"}, {"dst": "10.1.0.5", "dev": "vp0"}]
    devices = choose(links, addrs, routes, node_addresses={"fd00:200:0::b"})
    assert [(d.name, d.reason) for d in devices] == [("eth0", "node-address")]


def test_multipath_and_gateway_routes_count_every_nexthop_device() -> None:
    links = [LO, link(2, "bond0", "bond"), link(3, "ens5"), link(4, "ens6")]
    routes = [
        {
            "dst": "default",
            "nexthops": [{"gateway": "192.0.2.1", "dev": "ens5"}, {"gateway": "x", "dev": "ens6"}],
        },
        {"dst": "10.9.0.0/16", "gateway": "10.0.0.1", "dev": "bond0"},
    ]
    assert names(choose(links, [], routes)) == ["bond0", "ens5", "ens6"]


def test_only_ethernet_devices_are_marked_ether() -> None:
    """tc reads past a 14-byte link header only on a device that has one (tc.py DEV_ETHER, per device)."""
    wg = {**link(3, "wg0", "wireguard"), "link_type": "none"}
    devices = choose([LO, link(2, "eth0"), wg], [], [{"dst": "default", "dev": "eth0"}])
    assert [(d.name, d.ether) for d in devices] == [("eth0", True), ("wg0", False)]


def test_patterns_pick_exactly_the_named_devices_that_are_up() -> None:
    devices = choose(EKS_LINKS, EKS_ADDRS, EKS_ROUTES, patterns=("eth*", "eni3c4d"))
    assert names(devices) == ["eth0", "eth1", "eni3c4d"]  # eth2 is down, lo never
    assert {d.reason for d in devices} == {"explicit"}
