"""The `tc` mode's devices kept up to date while the agent runs (a secondary ENI attached later, a new
VXLAN device): `rescan()`, once per agent interval, chooses the devices again by the rule the start uses
(devices.py), in the network namespace the datapath started in, and

- hooks a new one of any kind with the dispatcher the loader loaded (the agent holds its fd: no compile, no
  bcc), as the start does (tc.py: a tcx link first in line, returning TCX_NEXT, else a classic clsact
  filter), pinned as the start pins it, so the next agent adopts it; its flags (Ethernet or not, VXLAN
  counted inside or not: tc.py DeviceConfig) are written first, so its first packet is read right;
- takes the attachment, the flags and the pin off a device that is gone or no longer chosen (a device
  deleted takes its tcx link or filter with it: the fd and the pin, the last holds, are let go);
- moves the pin of a hooked device that was renamed (same ifindex): its attachment stays, nothing missed.

One kind of device is chosen and not hooked: a VXLAN overlay on 4789 or 8472 appearing where the uplinks
count VXLAN as its inner packets (no overlay was hooked at the start, tc.py `covered`). Its packets are
counted there, exactly; its own egress would count them a second time. It is logged and counted
(`covered`) once. A device whose attach keeps failing is retried every interval and logged at its first
failure, then at most once per `FAILED_LOG_EVERY_S` with the failures not logged since.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from otel_kzt import netns
from otel_kzt.agent.datapath import bpfsys, devices, tclinks
from otel_kzt.agent.datapath.devices import Device
from otel_kzt.agent.datapath.tc import DeviceConfig, TcMode, pin_name
from otel_kzt.agent.flows import DeviceCounts
from otel_kzt.errors import DatapathError

log = logging.getLogger(__name__)
FAILED_LOG_EVERY_S = 300.0  # a device that cannot be hooked: one warning per device in this time


@dataclass(frozen=True, slots=True)
class _Hook:
    device: Device
    fd: int  # the tcx link's fd; -1 for a classic filter (no link: the filter is found by its handle)


class DeviceWatch:
    """Owns the tc attachments after the load: their link fds, the dispatcher's fd, the namespace's fd."""

    def __init__(
        self,
        mode: TcMode,
        dispatch_fd: int,
        hooked: Sequence[Device],
        link_fds: Sequence[int],
        *,
        directory: Path | None,
        config: DeviceConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`link_fds`: `TcMode.attach`'s, one per hooked device in order with tcx, none with classic.
        `config`: the devices' flags (the loader wrote the hooked ones'); owned from here on."""
        fds = list(link_fds) or [-1] * len(hooked)
        if len(fds) != len(hooked):
            config.close()
            raise DatapathError(f"tc: {len(fds)} link fds for {len(hooked)} hooked devices")
        self._mode, self._dispatch_fd, self._dir = mode, dispatch_fd, directory
        self._hooks = {d.name: _Hook(d, fd) for d, fd in zip(hooked, fds, strict=True)}
        self._config = config
        self._netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)  # where the loader attached
        self._lock = threading.Lock()
        self._added = self._removed = 0
        self._covered: set[tuple[str, int]] = set()
        self._clock = clock
        self._failing: dict[str, tuple[float, int]] = {}  # device -> (its last warning, failures since)

    def counts(self) -> DeviceCounts:
        with self._lock:
            return DeviceCounts(len(self._hooks), self._added, self._removed, len(self._covered))

    def link_fds(self) -> list[int]:
        with self._lock:
            return [h.fd for h in self._hooks.values() if h.fd >= 0]

    def rescan(self) -> DeviceCounts:
        """Choose the devices again and follow: hook new ones, unhook gone ones, move renamed ones' pins.
        A failure (the device list, one device's attach) is logged and retried at the next call."""
        with self._lock:
            if self._netns < 0:
                return DeviceCounts(0, self._added, self._removed, len(self._covered))  # closed
            with netns.entered_fd(self._netns):
                try:
                    chosen = devices.discover(self._mode.patterns, self._mode.node_addresses)
                except DatapathError as exc:
                    log.warning("tc devices not re-scanned: %s", exc)
                else:
                    self._follow(chosen)
                self._mode.hooked = [h.device for h in self._hooks.values()]
        return self.counts()

    def _follow(self, chosen: list[Device]) -> None:
        by_name = {d.name: d for d in chosen}
        by_index = {d.ifindex: d for d in chosen}
        for name, hook in list(self._hooks.items()):
            now = by_name.get(name)
            if now is not None and now.ifindex == hook.device.ifindex:
                continue
            renamed = by_index.get(hook.device.ifindex)
            if renamed is not None and renamed.name not in self._hooks:
                self._rename(hook, renamed)
            else:
                self._unhook(hook)
        for name in [n for n in self._failing if n not in by_name]:
            del self._failing[name]  # gone before it could be hooked: nothing left to warn about
        for device in chosen:
            if device.name not in self._hooks:
                self._hook(device)

    def _pin(self, name: str) -> str | None:
        return str(self._dir / pin_name(name)) if self._dir is not None else None

    def _hook(self, device: Device) -> None:
        if self._mode.covered(device):
            if (device.name, device.ifindex) not in self._covered:
                self._covered.add((device.name, device.ifindex))
                log.info("tc device not hooked, its VXLAN packets are counted inside at the uplinks "
                         "device=%s port=%d", device.name, device.port)  # fmt: skip
            return
        try:
            self._config.set(device.ifindex, self._mode.flags(device))  # before its first packet
            fd = self._mode.attach_device(self._dispatch_fd, device, self._dir)
        except DatapathError as exc:
            with contextlib.suppress(DatapathError):
                self._config.clear(device.ifindex)
            self._failed(device.name, exc)
            return
        self._failing.pop(device.name, None)
        self._hooks[device.name] = _Hook(device, fd)
        self._added += 1
        log.info("tc device hooked while running device=%s reason=%s ifindex=%d flags=%d",
                 device.name, device.reason, device.ifindex, self._mode.flags(device))  # fmt: skip

    def _failed(self, name: str, exc: DatapathError) -> None:
        now = self._clock()
        last, quiet = self._failing.get(name, (None, 0))
        if last is not None and now - last < FAILED_LOG_EVERY_S:
            self._failing[name] = (last, quiet + 1)
            return
        self._failing[name] = (now, 0)
        log.warning("tc device not hooked, retried next interval device=%s not_logged=%d error=%s",
                    name, quiet, exc)  # fmt: skip

    def _unhook(self, hook: _Hook) -> None:
        name = hook.device.name
        present = _ifindex(name) == hook.device.ifindex  # else deleted: its attachment went with it
        try:
            if present and hook.fd >= 0:
                bpfsys.link_detach(hook.fd)
            elif present:
                tclinks.classic_detach(name)
        except DatapathError as exc:
            log.warning("tc device: detaching failed, its pin and fd let go device=%s error=%s", name, exc)
        if hook.fd >= 0:
            os.close(hook.fd)
        try:
            self._config.clear(hook.device.ifindex)  # after the detach: no packet of it runs the program
        except DatapathError as exc:
            log.warning("tc device: its flags not removed device=%s error=%s", name, exc)
        path = self._pin(name)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        del self._hooks[name]
        self._removed += 1
        log.info("tc device unhooked device=%s %s", name, "no longer chosen" if present else "gone")

    def _rename(self, hook: _Hook, device: Device) -> None:
        old, new = self._pin(hook.device.name), self._pin(device.name)
        if old is not None and new is not None:
            try:
                os.rename(old, new)
            except OSError as exc:  # then as a device gone and one new: re-attached under its new name
                log.warning("tc device renamed, pin not moved device=%s error=%s", device.name, exc)
                self._unhook(hook)
                return
        del self._hooks[hook.device.name]
        self._hooks[device.name] = _Hook(device, hook.fd)
        log.info("tc device renamed, attachment kept device=%s was=%s", device.name, hook.device.name)

    def close(self, *, detach: bool) -> None:
        """Let go of every fd; with `detach`, take the program off every hooked device. Safe twice."""
        with self._lock:
            if self._netns < 0:
                return
            fds = [h.fd for h in self._hooks.values() if h.fd >= 0]
            with netns.entered_fd(self._netns):
                self._mode.release(fds, detach=detach)
            self._hooks.clear()
            for fd in (self._dispatch_fd, self._netns):
                os.close(fd)
            self._config.close()
            self._dispatch_fd = self._netns = -1


def _ifindex(name: str) -> int:
    """The device's ifindex in the calling thread's namespace; 0 when there is none by that name."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0
