"""tc's per-device flags (tc.py): what each device kind is told (Ethernet, VXLAN counted inside), which
device is left to the uplinks (`covered`), and DeviceConfig's slots: a device in its ifindex's array slot,
one whose slot another hooked device holds in tcdev_more, both found, cleared and pruned. The program's
side of the same maps is tests/kernel/test_datapath_tc_fast.py's."""

from __future__ import annotations

import struct

from otel_kzt.agent.datapath import tc
from otel_kzt.agent.datapath.devices import Device, choose

ETH0 = Device("eth0", 2, "", "route", ether=True)
WG0 = Device("wg0", 9, "wireguard", "overlay", ether=False)
FLANNEL = Device("flannel.1", 5, "vxlan", "overlay", ether=True, port=8472)
VX_OTHER = Device("vx9", 6, "vxlan", "overlay", ether=True, port=9999)
GENEVE = Device("genev0", 7, "geneve", "overlay", ether=True)


class DictMap:
    """A BpfMap's lookup/update/delete on a dict, a missing array slot read as zeros."""

    def __init__(self, array_value_size: int = 0) -> None:
        self.items: dict[bytes, bytes] = {}
        self._zero = bytes(array_value_size) if array_value_size else None
        self.closed = False

    def lookup(self, key: bytes) -> bytes | None:
        return self.items.get(key, self._zero)

    def update(self, key: bytes, value: bytes) -> None:
        self.items[key] = value

    def delete(self, key: bytes) -> bool:
        return self.items.pop(key, None) is not None

    def close(self) -> None:
        self.closed = True


def mode_with(*hooked: Device) -> tc.TcMode:
    mode = tc.TcMode()
    mode.hooked = list(hooked)
    return mode


def test_an_uplink_only_start_counts_vxlan_inside_and_leaves_a_vxlan_overlay_on_its_ports_to_it() -> None:
    mode = mode_with(ETH0)
    assert mode.inner
    assert mode.flags(ETH0) == tc.DEV_ETHER | tc.DEV_INNER
    assert mode.flags(WG0) == 0  # no Ethernet header; an overlay's own packets are the inner ones
    assert mode.flags(GENEVE) == tc.DEV_ETHER
    assert mode.covered(FLANNEL)
    assert not mode.covered(VX_OTHER)  # its port is not one the uplinks look inside: hooked
    assert not any(mode.covered(d) for d in (ETH0, WG0, GENEVE))


def test_with_an_overlay_at_the_start_nothing_counts_vxlan_inside_and_every_overlay_is_hooked() -> None:
    mode = mode_with(ETH0, FLANNEL)
    assert not mode.inner
    assert mode.flags(ETH0) == tc.DEV_ETHER
    assert mode.flags(FLANNEL) == tc.DEV_ETHER
    assert not mode.covered(Device("flannel.2", 8, "vxlan", "overlay", ether=True, port=8472))
    mode.hooked = [ETH0]  # the overlay gone while running: the choice made at the start stays
    assert not mode.inner
    assert mode.handover()["inner"] is False
    other = tc.TcMode()
    other.take_over(mode.handover())
    assert not other.inner and other.hooked == [ETH0]


def test_the_program_needs_no_flag_of_the_devices() -> None:
    assert mode_with(ETH0).cflags(None) == mode_with(WG0, FLANNEL).cflags(None) == []  # type: ignore[arg-type]


def config() -> tuple[tc.DeviceConfig, DictMap, DictMap]:
    slots, more = DictMap(8), DictMap()
    return tc.DeviceConfig(slots, more), slots, more  # type: ignore[arg-type]


def test_device_config_puts_a_device_whose_slot_is_taken_in_the_second_map() -> None:
    cfg, slots, more = config()
    a, b = 3, 3 + tc.DEV_SLOTS  # the same slot
    cfg.set(a, tc.DEV_ETHER | tc.DEV_INNER)
    cfg.set(b, 0)
    assert slots.items == {struct.pack("<I", 3): struct.pack("<II", a, 3)}
    assert more.items == {struct.pack("<I", b): struct.pack("<I", 0)}
    assert (cfg.get(a), cfg.get(b), cfg.get(4)) == (3, 0, None)
    cfg.set(a, tc.DEV_ETHER)  # rewritten in place
    assert cfg.get(a) == tc.DEV_ETHER
    cfg.clear(a)
    assert cfg.get(a) is None and cfg.get(b) == 0  # b still found, in the second map
    cfg.set(b, tc.DEV_ETHER)  # the slot is free now: b moves into it, out of the second map
    assert cfg.get(b) == tc.DEV_ETHER and more.items == {}
    cfg.clear(b)
    assert slots.items == {struct.pack("<I", 3): bytes(8)} and more.items == {}


def test_configure_writes_every_hooked_device_and_drops_the_others() -> None:
    cfg, slots, more = config()
    cfg.set(40, tc.DEV_ETHER)  # a device of an earlier start, gone since
    cfg.set(40 + tc.DEV_SLOTS, 0)
    cfg.set(ETH0.ifindex + tc.DEV_SLOTS, tc.DEV_ETHER)
    mode = mode_with(ETH0, WG0)  # an overlay at the start: VXLAN is not counted inside
    mode.configure(cfg, [40 + tc.DEV_SLOTS])
    assert (cfg.get(ETH0.ifindex), cfg.get(WG0.ifindex)) == (tc.DEV_ETHER, 0)
    assert cfg.get(40) is None and cfg.get(40 + tc.DEV_SLOTS) is None
    cfg.close()
    assert slots.closed and more.closed


def test_a_vxlan_devices_port_is_read_from_its_link_details() -> None:
    def vxlan(index: int, name: str, data: dict[str, int] | None) -> dict[str, object]:
        info: dict[str, object] = {"info_kind": "vxlan"}
        if data is not None:
            info["info_data"] = data
        return {"ifindex": index, "ifname": name, "flags": ["UP"], "link_type": "ether", "linkinfo": info}

    links = [vxlan(4, "vx-iana", {"id": 1, "port": 4789}), vxlan(5, "vx-none", None)]
    links.append({"ifindex": 6, "ifname": "eth0", "flags": ["UP"], "link_type": "ether"})
    routes = [{"dst": "default", "gateway": "10.0.0.1", "dev": "eth0"}]
    got = {d.name: d.port for d in choose(links, [], routes)}
    assert got == {"vx-iana": 4789, "vx-none": 8472, "eth0": 0}
