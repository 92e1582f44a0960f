"""The node datapath's shared core: starts a mode (the loader child compiles its entry file under `bpf/`
with bcc and attaches it in the calling thread's network namespace), reads cumulative per-flow counters,
evicts idle flows. Nothing here depends on where the mode sees packets.

bcc (and its ~100 MB of LLVM) never enters this process: `loader` compiles, loads, attaches and pins in a
short-lived child, which hands over fds for the maps, the evictor and the links.

Pinned (the default) links and maps live under `<pin_root>/<node>/` and survive the agent:
- unchanged program on restart: everything is adopted as is, counters and first-seen times carry on;
- changed program (another source hash): the new counter replaces the old in the dispatcher's program
  array with one atomic map update, so no packet is counted twice or missed;
- changed map layout or size: the node is reset (logged), as old and new values cannot be mixed.

Eviction of idle flows is lossless: the kernel-side evictor marks them dead (packets that race with it
go to a per-flow dying entry), an RCU grace period lets every program that saw them alive finish, their
final values are read and they are deleted; after a second grace period the dying entries are added.
The totals reach the next snapshot (`Snapshot.evicted`). See `flowtables.FlowTables.evict`.

First-seen times are kept in the kernel as CLOCK_BOOTTIME; the boot-time -> Unix offset is computed once
per datapath and kept in the pinned `meta` map, so every read and every process that adopts the pins
derives bit-identical `first_seen_unix_ns` (the enricher takes a changed start time for a counter reset).
A fresh datapath (first start, reset, --no-pin) computes a new one. The price: a wall-clock step after
that (NTP) shifts no start time, so first-seen times stay on the clock as it was at the first start.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from otel_kzt.agent.datapath import bpfsys, flowmap, loader, modes, pins, probe
from otel_kzt.agent.datapath.bpfmap import BpfMap, u32
from otel_kzt.agent.datapath.flowtables import FlowTables
from otel_kzt.agent.datapath.tc import DEV_MAPS, DeviceConfig, TcMode
from otel_kzt.agent.datapath.tcwatch import DeviceWatch
from otel_kzt.agent.flows import DeviceCounts, FlowCounters, FlowKey, Snapshot
from otel_kzt.errors import ConfigError, KernelUnsupported

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatapathConfig:
    node_name: str
    pin: bool = True  # False: detach on close()
    map_size: int = 65536  # flow map entries, per address family (IPv4 and IPv6 maps)
    ephemeral_min: int = 32768  # ephemeral port range: never in a key
    ephemeral_max: int = 65535
    pin_root: str = pins.DEFAULT_PIN_ROOT  # pins under <pin_root>/<pins.pin_dir_name(node_name)>/
    mode: str = "netfilter"  # modes.MODES: where the counter sees packets
    tc_devices: tuple[str, ...] = ()  # tc: device name patterns (empty: devices.py's default choice)
    cgroup_root: str | None = None  # cgroup: the cgroup v2 directory (None: the host's cgroup2 mount)

    def validate(self) -> None:
        modes.by_name(self.mode)
        pins.node_dir(self.node_name, self.pin_root)
        pins.check_pin_root(self.pin_root)
        if not 1 <= self.map_size <= 1 << 24:
            raise ConfigError("map_size", f"must be between 1 and {1 << 24}, got {self.map_size}")
        if not 1 <= self.ephemeral_min <= self.ephemeral_max <= 65535:
            raise ConfigError("ephemeral_min", "need 1 <= ephemeral_min <= ephemeral_max <= 65535")


class Datapath:
    """Implements `otel_kzt.agent.flows.FlowReader` on the real kernel."""

    def __init__(self, config: DatapathConfig) -> None:
        config.validate()
        self.config = config
        self._dir = pins.node_dir(config.node_name, config.pin_root)
        self.mode = modes.create(config.mode, tc_devices=config.tc_devices, cgroup_root=config.cgroup_root)
        self._features: probe.Features | None = None
        self._cflags: list[str] = []
        self._maps: dict[str, BpfMap] = {}
        self._evict_fd = -1
        self._flush_fd = -1  # count.h's kzt_flush (empties the write-combining slots), when it can run
        self._link_fds: list[int] = []
        self._devices: DeviceWatch | None = None  # tc: the hooked devices, followed while running
        self._lock = threading.Lock()
        self._evicted: dict[FlowKey, FlowCounters] = {}
        # Each live flow's key, found by the raw key a read returns (a FlowKey equals its raw bytes: one
        # object per flow however often it is read, the one every cache holds), and the previous
        # snapshot's counters by key (last-seen = when the packet count last changed): a steady state
        # allocates little, and 100,000 flows stay within the memory budget.
        self._keys: dict[bytes, FlowKey] = {}
        self._prev: dict[FlowKey, FlowCounters] = {}
        self._tables: FlowTables | None = None

    # --- start -----------------------------------------------------------------------------------------

    def _request(self) -> loader.LoadRequest:
        c = self.config
        return loader.LoadRequest(
            c.node_name,
            c.pin,
            c.pin_root,
            c.map_size,
            c.ephemeral_min,
            c.ephemeral_max,
            c.mode,
            c.tc_devices,
            c.cgroup_root,
        )

    def _build_flags(self) -> list[str]:
        # BTF is world-readable: --print-bpf needs no root
        return loader.cflags(self._request(), self._features_or_probe())

    def bpf_source(self) -> str:
        """The final C (flags, header, program), for a `--print-bpf` switch."""
        return probe.final_source(self.mode, self._cflags or self._build_flags())

    def start(self) -> None:
        """Probe, compile, load, attach (or adopt what is pinned). Undoes a half-finished start."""
        with self._lock:
            if self._tables is not None:
                return
            probe.require_root()
            c = self.config
            loaded = loader.load(self._request())  # the child's fds are ours from here on
            self._cflags = loaded.cflags
            self._link_fds, self._evict_fd, self._flush_fd = loaded.link_fds, loaded.evict_fd, loaded.flush_fd
            loaded.link_fds, loaded.evict_fd, loaded.flush_fd = [], -1, -1
            try:
                self._watch_devices(loaded)
                for name in list(loaded.maps):
                    self._maps[name] = BpfMap(loaded.maps.pop(name), name)  # it owns the fd now
                self._tables = FlowTables(
                    self._maps, c.map_size, self._evict_fd, loaded.boot_offset, self._flush_fd
                )
                self._finish_leftover_evictions()
            except BaseException:
                loaded.close()
                self._close_locked(detach=not c.pin)
                raise

    def _watch_devices(self, loaded: loader.Loaded) -> None:
        """tc: the link fds and the dispatcher go to the device watch (in the namespace of this thread,
        the one the loader attached in)."""
        if loaded.tc is None or not isinstance(self.mode, TcMode):
            return
        hooked = self.mode.take_over(loaded.tc)
        directory = self._dir if self.config.pin else None
        slots, more = (BpfMap(loaded.maps.pop(name), name) for name in DEV_MAPS)
        self._devices = DeviceWatch(
            self.mode, loaded.dispatch_fd, hooked, self._link_fds, directory=directory,
            config=DeviceConfig(slots, more),
        )  # fmt: skip
        loaded.dispatch_fd, self._link_fds = -1, []

    def rescan_devices(self) -> DeviceCounts | None:
        """tc: hook the devices that leave the node now and were not hooked, unhook those gone (the
        agent calls it every interval, tcwatch.py); None in the other modes. Never raises for a device:
        what fails is logged and tried again at the next call."""
        watch = self._devices
        return watch.rescan() if watch is not None else None

    @property
    def link_fds(self) -> list[int]:
        """The links this process holds now (tc: its hooked devices' tcx links), for inspection; the
        datapath keeps owning them."""
        watch = self._devices
        return watch.link_fds() if watch is not None else list(self._link_fds)

    @property
    def attached(self) -> bool:
        """Started: the loader attached (or adopted) every attachment before it handed over (read without
        the lock: a health check must never wait on a stuck read). Not "holds link fds": a classic tc
        filter (kernels before 6.6) is held by no link."""
        return self._tables is not None

    def _features_or_probe(self) -> probe.Features:
        if self._features is None:
            self._features = probe.probe(self.mode)
        return self._features

    # --- read --------------------------------------------------------------------------------------------

    def _tables_or_raise(self) -> FlowTables:
        if self._tables is None:
            raise KernelUnsupported("datapath not started")
        return self._tables

    def snapshot(self) -> Snapshot:
        """Cumulative counters of every flow, the overflow bucket and the counted losses."""
        with self._lock:
            tables = self._tables_or_raise()
            tables.flush()
            now = time.time_ns()
            flows: dict[FlowKey, FlowCounters] = {}
            for layout in flowmap.LAYOUTS.values():
                self._decode_into(tables, layout, now, flows)
            self._forget_gone(flows)
            overflow_bytes, overflow_packets = tables.percpu_sums("overflow", 0)
            created = self._maps["meta"].lookup(u32(loader.META_CREATED))
            evicted, self._evicted = self._evicted, {}
            return Snapshot(
                flows=flows,
                overflow_bytes=overflow_bytes,
                overflow_packets=overflow_packets,
                capacity=self.config.map_size,
                taken_unix_ns=now,
                insert_failures=tables.percpu_sums("stats", flowmap.STAT_INSERT_FAILED)[0],
                eviction_races=tables.percpu_sums("stats", flowmap.STAT_EVICT_RACE)[0],
                evicted=evicted,
                started_unix_ns=int.from_bytes(created, "little") if created else 0,
            )

    def _decode_into(
        self, tables: FlowTables, layout: flowmap.Layout, now: int, flows: dict[FlowKey, FlowCounters]
    ) -> None:
        """Decode one family's map straight from the batch buffers (no intermediate copy). An unchanged
        flow keeps the previous snapshot's key and counter objects: a steady state allocates little."""
        offset, ks, vs = tables.boot_offset, layout.key.size, layout.value.size
        known, prev = self._keys, self._prev
        raw_key, value = _raw_key(ks), layout.counts
        for keys, values, count in tables.batches(layout):
            # Both buffers unpacked by C iterators: no slice, no call per flow.
            raws, decoded = raw_key.iter_unpack(keys[: count * ks]), value.iter_unpack(values[: count * vs])
            for (raw,), (nbytes, packets, first_boot) in zip(raws, decoded, strict=True):
                key = known.get(raw)
                if key is None:
                    key = FlowKey.of_raw(raw)
                    known[key] = key
                counters = prev.get(key)
                first_seen = first_boot + offset
                # The kernel keeps no last-seen time (a clock read per packet): the snapshot that first
                # saw the current packet count stands in for it.
                if counters is None or counters.first_seen_unix_ns != first_seen:
                    counters = FlowCounters(nbytes, packets, first_seen, now)
                elif counters.packets != packets:  # the same run: its start object is kept (memory)
                    counters = FlowCounters(nbytes, packets, counters.first_seen_unix_ns, now)
                flows[key] = counters

    def _forget_gone(self, flows: dict[FlowKey, FlowCounters]) -> None:
        """Keep the decoded keys of the flows still in the maps only; these flows are the next `_prev`."""
        if len(self._keys) > len(flows):
            for key in [key for key in self._keys if key not in flows]:
                del self._keys[key]
        self._prev = flows

    # --- evict -------------------------------------------------------------------------------------------

    def evict(self, keys: Iterable[FlowKey]) -> int:
        """Remove flows without losing a byte; their final counters appear in the next `Snapshot.evicted`.

        Packets that race with the eviction are added to their flow's final value (and counted in
        `Snapshot.eviction_races`); a packet after the eviction starts the flow anew."""
        by_layout: dict[flowmap.Layout, list[bytes]] = {layout: [] for layout in flowmap.LAYOUTS.values()}
        for key in dict.fromkeys(keys):
            by_layout[flowmap.LAYOUTS[key.family]].append(key)
        with self._lock:
            tables = self._tables_or_raise()
            if self._evict_fd < 0:
                raise KernelUnsupported(
                    "eviction needs BPF_PROG_TEST_RUN for netfilter programs (Linux >= 6.6)"
                )
            final = tables.evict(by_layout)
            for key, counters in final.items():
                self._keys.pop(key, None)
                previous = self._prev.get(key)
                last = previous.last_seen_unix_ns if previous else counters.last_seen_unix_ns
                self._evicted[key] = replace(counters, last_seen_unix_ns=last)
            log.debug("evicted flows=%d node=%s", len(final), self.config.node_name)
            return len(final)

    def _finish_leftover_evictions(self) -> None:
        """A previous agent may have died in the middle of an eviction: finish it."""
        if self._tables is None or self._evict_fd < 0:
            return
        tables = self._tables
        dead = {
            layout: [raw for raw, value in tables.read(layout).items() if value[3]]
            for layout in flowmap.LAYOUTS.values()
        }
        bpfsys.synchronize_rcu()
        tables.flush()  # what the slots hold of a dead flow goes to its dying entry
        finals = {layout: tables.collect_dead(layout, raw_keys) for layout, raw_keys in dead.items()}
        bpfsys.synchronize_rcu()
        for layout, final in finals.items():
            self._evicted.update(tables.fold_dying(layout, final))
            # Whatever is left belongs to flows deleted before the crash: report it on its own (the
            # previous agent's final value of that flow never left its memory).
            for key, rest in tables.sweep_dying(layout).items():
                self._evicted.setdefault(key, rest)
        if self._evicted:
            log.info("finished evictions left by a previous agent flows=%d", len(self._evicted))

    # --- stop --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release this process's hold; detach only when not pinned. Safe twice and before start()."""
        with self._lock:
            self._close_locked(detach=not self.config.pin)

    def _close_locked(self, *, detach: bool) -> None:
        if self._devices is not None:  # tc: it holds the links now
            self._devices.close(detach=detach)
            self._devices = None
        else:
            self.mode.release(self._link_fds, detach=detach)
        self._link_fds = []
        self._tables = None
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps = {}
        for fd in (self._evict_fd, self._flush_fd):
            if fd >= 0:
                os.close(fd)
        self._evict_fd = self._flush_fd = -1


@functools.cache
def _raw_key(size: int) -> struct.Struct:
    """A whole raw key as one bytes field (what `_keys` is looked up by)."""
    return struct.Struct(f"{size}s")


def cleanup(node_name: str, pin_root: str = pins.DEFAULT_PIN_ROOT) -> None:
    """Detach and unpin everything of one node (uninstall, demo, tests)."""
    pins.cleanup(node_name, pin_root)
