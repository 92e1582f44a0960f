"""The `tc` mode: the counter at the egress of every device traffic leaves the node by (any kernel).

For kernels without netfilter BPF links (EKS AL2023 and Bottlerocket on 6.1, Ubuntu 22.04 on 5.15) and for
CNIs that move pod packets past netfilter but still hand them to a device (Cilium eBPF host routing,
Calico eBPF). Which devices: `devices.py`. One pin per device, `tc_<device>` (a `.` in the name becomes
`%`: bpffs refuses dots): a tcx link on Linux >= 6.6, else the dispatcher program of a classic clsact
filter (`tclinks.py`). A device no longer chosen at a restart is detached and its pin removed; while the
agent runs, `tcwatch.py` chooses again every interval and follows (devices plugged in, unplugged, renamed).

It sees traffic after DNAT and after source NAT (a masqueraded pod's packets carry the node's address,
and count as the node's), and nothing that stays on the node. Without an overlay device among the devices
hooked at the start, VXLAN packets are counted as their inner packets (`DEV_INNER`); with one, the inner
packets are counted on the overlay device and the encapsulation on the uplink is left out by the agent.

One program build serves every device: what differs by device is a few flags the program reads per
packet (`DeviceConfig`, tc.c's tcdev), written before the device is hooked: whether it frames its packets
in Ethernet (`DEV_ETHER`), and whether VXLAN is counted inside (`DEV_INNER`). So the device set decides
no compile flag, and a device of any kind can be hooked while the agent runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from otel_kzt.agent.datapath import bpfsys, devices, tclinks
from otel_kzt.agent.datapath.bpfmap import BpfMap, u32
from otel_kzt.agent.datapath.btf import Btf
from otel_kzt.errors import DatapathError, KernelUnsupported

log = logging.getLogger(__name__)

BPF_PROG_TYPE_SCHED_CLS = 3
PIN_PREFIX = "tc_"
VXLAN_PORTS = (4789, 8472)  # IANA, and Linux's (flannel's) default: tc.c counts these inside (count.h)
# A device's flags (tc.c KZT_DEV_*): an Ethernet link header; VXLAN to VXLAN_PORTS counted as its inner packet
DEV_ETHER, DEV_INNER = 1, 2
DEV_SLOTS = 256  # tc.c KZT_DEV_SLOTS
DEV_MAPS = ("tcdev", "tcdev_more")  # tc's own maps, pinned beside the others (loader.py sends their fds)
_DEV = struct.Struct("<II")  # struct kzt_dev: ifindex, flags
# "1": classic clsact filters even where tcx links exist: what kernels before 6.6 get by themselves, so the
# kernel tests can run that path on a newer kernel (the loader child inherits the environment).
CLASSIC_ENV = "OTEL_KZT_TC_CLASSIC"
TRANSIENT_PIN_DIR = "/sys/fs/bpf"  # without pinning, a classic filter still loads its program from a pin


def pin_name(device: str) -> str:
    return PIN_PREFIX + device.replace(".", "%")


def device_of_pin(name: str) -> str:
    return name.removeprefix(PIN_PREFIX).replace("%", ".")


class TcMode:
    """`mode.Mode` for tc: configured with the `--tc-devices` patterns (empty: the default choice)."""

    name = "tc"
    entry = "tc.c"
    prog_type = BPF_PROG_TYPE_SCHED_CLS
    attach_type = -1  # bcc: no expected attach type
    test_run_function = "bpf_prog_test_run_skb"
    runs_on_one_cpu = True  # tcx and tc egress run with bottom halves off

    def __init__(self, patterns: Sequence[str] = (), node_addresses: Collection[str] = ()) -> None:
        self.patterns = tuple(patterns)
        self.node_addresses = frozenset(node_addresses)
        self._devices: list[devices.Device] | None = None
        self._inner: bool | None = None
        self._tcx = False

    @property
    def hooked(self) -> list[devices.Device]:
        """The devices to hook: chosen at the first ask (the loader child's), then the agent's take-over
        and tcwatch.py's updates."""
        if self._devices is None:
            self._devices = devices.discover(self.patterns, self.node_addresses)
        return self._devices

    @hooked.setter
    def hooked(self, now: list[devices.Device]) -> None:
        """What tcwatch.py hooked while running: what `release` detaches."""
        self._devices = list(now)

    @property
    def inner(self) -> bool:
        """Whether the uplinks count VXLAN as its inner packets: decided by the devices hooked at the start
        (no overlay device among them), kept while the agent runs."""
        if self._inner is None:
            self._inner = not any(d.overlay for d in self.hooked)
        return self._inner

    def flags(self, device: devices.Device) -> int:
        """What the program is told of `device` (DeviceConfig): DEV_ETHER, DEV_INNER."""
        inner = self.inner and not device.overlay
        return (DEV_ETHER if device.ether else 0) | (DEV_INNER if inner else 0)

    def covered(self, device: devices.Device) -> bool:
        """A VXLAN overlay on a port the uplinks count inside (`inner`): its packets are counted there,
        as their inner packets, exactly; hooking it too would count them twice, so it is not hooked."""
        return self.inner and device.kind == "vxlan" and device.port in VXLAN_PORTS

    def configure(self, config: DeviceConfig, more_keys: Iterable[int]) -> None:
        """The loader's step before it installs the counter and attaches: every device to hook gets its
        flags; entries of devices no longer hooked (`more_keys`: the ifindexes in tcdev_more) go."""
        for device in self.hooked:
            config.set(device.ifindex, self.flags(device))
        config.keep_only({d.ifindex for d in self.hooked}, more_keys)

    @property
    def link_names(self) -> tuple[str, ...]:
        return tuple(pin_name(d.name) for d in self.hooked)

    def owns_pin(self, name: str) -> bool:
        return name.startswith(PIN_PREFIX)

    def check(self, btf: Btf) -> None:
        if btf.enum_value("bpf_prog_type", "BPF_PROG_TYPE_SCHED_CLS") != BPF_PROG_TYPE_SCHED_CLS:
            raise KernelUnsupported("kernel has no BPF classifiers (BPF_PROG_TYPE_SCHED_CLS)")
        self._tcx = btf.enum_value("bpf_attach_type", "BPF_TCX_EGRESS") == tclinks.BPF_TCX_EGRESS
        if os.environ.get(CLASSIC_ENV) == "1":
            self._tcx = False
        if not self.hooked:
            wanted = ",".join(self.patterns) or "devices with a gateway route, a node address, or overlays"
            raise DatapathError(f"tc datapath: no device to hook (up, not loopback): {wanted}")

    def cflags(self, btf: Btf) -> list[str]:
        return []  # nothing depends on the devices: each one's flags are read per packet (DeviceConfig)

    def attach(self, programs: dict[str, int], directory: Path | None, *, adopt: bool) -> list[int]:
        dispatch_fd = programs["kzt_dispatch"]
        fds = []
        for device in self.hooked:
            path = str(directory / pin_name(device.name)) if directory is not None else None
            fd = self._attach_one(dispatch_fd, device, path, adopt=adopt)
            if fd >= 0:
                fds.append(fd)
        if directory is not None:
            self._drop_unchosen(directory)
        log.info(
            "tc datapath on %s (%s)",
            ",".join(f"{d.name}:{d.reason}" for d in self.hooked),
            "tcx, first" if self._tcx else "classic clsact filter",
        )
        return fds

    def handover(self) -> dict[str, Any]:
        """What the loader child tells the agent of its attachments (tcwatch.py keeps them up to date):
        tcx or classic, and the devices hooked, in the order of the link fds `attach` returned."""
        return {"tcx": self._tcx, "inner": self.inner, "devices": [asdict(d) for d in self.hooked]}

    def take_over(self, state: dict[str, Any]) -> list[devices.Device]:
        """The agent's side of `handover`: the child's choice, not a new one in whatever namespace the
        agent's thread is in."""
        self._tcx = bool(state["tcx"])
        self._inner = bool(state["inner"])
        self._devices = [devices.Device(**d) for d in state["devices"]]
        return list(self._devices)

    def attach_device(self, dispatch_fd: int, device: devices.Device, directory: Path | None) -> int:
        """Hook one more device as `attach` does (a stale pin of its name is replaced, never adopted);
        returns its tcx link fd, -1 for a classic filter."""
        path = str(directory / pin_name(device.name)) if directory is not None else None
        return self._attach_one(dispatch_fd, device, path, adopt=False)

    def _attach_one(self, dispatch_fd: int, device: devices.Device, path: str | None, *, adopt: bool) -> int:
        old_fd = -1
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                old_fd = bpfsys.obj_get(path)
        old = tclinks.tcx_info(old_fd) if old_fd >= 0 else None
        if self._tcx:
            if old is not None and adopt and old.ifindex == device.ifindex:
                log.info("tc link adopted device=%s pin=%s", device.name, path)
                return old_fd
            fd = tclinks.tcx_attach(dispatch_fd, device.ifindex, device.name)
            bpfsys.replace_pin(path, old_fd, fd, self._detacher(old is not None, device.name))
            log.info("tc link attached device=%s pin=%s", device.name, path)
            return fd
        if old_fd >= 0 and adopt and old is None and tclinks.classic_find(device.name) is not None:
            os.close(old_fd)
            log.info("tc filter adopted device=%s pin=%s", device.name, path)
            return -1
        self._classic(dispatch_fd, device.name, path, old_fd, old is not None)
        return -1

    @staticmethod
    def _detacher(old_is_link: bool, device: str) -> Callable[[int], None]:
        """How the attachment a pin stood for comes off: its link, or the classic filter on `device`."""
        if old_is_link:
            return bpfsys.link_detach

        def remove_filter(_fd: int) -> None:
            tclinks.classic_detach(device)

        return remove_filter

    def _classic(
        self, dispatch_fd: int, device: str, path: str | None, old_fd: int, old_is_link: bool
    ) -> None:
        """A classic filter takes the program from a pin: the node's pin, or a transient one."""
        if old_fd >= 0 and path is not None:
            if old_is_link:
                bpfsys.link_detach(old_fd)
            os.close(old_fd)
            os.unlink(path)
        pin = path or f"{TRANSIENT_PIN_DIR}/kzt_tc_{os.getpid()}"
        bpfsys.obj_pin(dispatch_fd, pin)
        try:
            tclinks.classic_attach(pin, device)  # replaces an old filter of ours in place
        finally:
            if path is None:
                os.unlink(pin)

    def _drop_unchosen(self, directory: Path) -> None:
        keep = set(self.link_names)
        for entry in sorted(directory.glob(PIN_PREFIX + "*")):
            if entry.name not in keep:
                tclinks.detach_pinned(str(entry), device_of_pin(entry.name))
                entry.unlink()
                log.info("tc device no longer hooked, detached device=%s", device_of_pin(entry.name))

    def release(self, fds: list[int], *, detach: bool) -> None:
        """Close this process's fds; with `detach`, take the program off every hooked device (the agent's
        `take_over` list: run in the namespace they are in)."""
        bpfsys.close_links(fds, detach=detach)
        if detach and not fds:  # classic filters: no link holds them, remove them by name
            for device in self.hooked:
                tclinks.classic_detach(device.name)


def detach_classic_pins(directory: Path) -> int:
    """For cleanup: remove the classic filters a node's `tc_*` program pins stand for (tcx links are
    detached with every other link)."""
    removed = 0
    for entry in sorted(directory.glob(PIN_PREFIX + "*")) if directory.is_dir() else []:
        fd = bpfsys.obj_get(str(entry))
        try:
            is_link = tclinks.tcx_info(fd) is not None
        finally:
            os.close(fd)
        if not is_link:
            removed += tclinks.classic_detach(device_of_pin(entry.name))
    return removed


class DeviceConfig:
    """The flags tc.c reads per packet for each hooked device (tcdev, tcdev_more): written before a device
    is hooked, removed after it is unhooked. Owns its two maps' fds."""

    def __init__(self, slots: BpfMap, more: BpfMap) -> None:
        self._slots, self._more = slots, more

    def _slot(self, ifindex: int) -> tuple[bytes, int, int]:
        """The array slot of `ifindex`: its key, the device it holds (0: none) and that one's flags."""
        key = u32(ifindex % DEV_SLOTS)
        owner, flags = _DEV.unpack(self._slots.lookup(key) or bytes(_DEV.size))
        return key, owner, flags

    def set(self, ifindex: int, flags: int) -> None:
        key, owner, _flags = self._slot(ifindex)
        if owner in (0, ifindex):
            self._slots.update(key, _DEV.pack(ifindex, flags))
            self._more.delete(u32(ifindex))
        else:  # the slot is another hooked device's: the program looks in tcdev_more next
            self._more.update(u32(ifindex), u32(flags))

    def clear(self, ifindex: int) -> None:
        key, owner, _flags = self._slot(ifindex)
        if owner == ifindex:
            self._slots.update(key, _DEV.pack(0, 0))
        self._more.delete(u32(ifindex))

    def get(self, ifindex: int) -> int | None:
        """The flags the program finds for `ifindex` (None: none, it counts as on a device with none)."""
        _key, owner, flags = self._slot(ifindex)
        if owner == ifindex:
            return flags
        raw = self._more.lookup(u32(ifindex))
        return struct.unpack("<I", raw)[0] if raw is not None else None

    def keep_only(self, keep: Collection[int], more_keys: Iterable[int]) -> None:
        for slot in range(DEV_SLOTS):
            key, owner, _flags = self._slot(slot)
            if owner and owner not in keep:
                self._slots.update(key, _DEV.pack(0, 0))
        for ifindex in list(more_keys):
            if ifindex not in keep:
                self._more.delete(u32(ifindex))

    def close(self) -> None:
        self._slots.close()
        self._more.close()
