"""The node datapath: compiles `bpf/flow.c` with bcc, attaches it at netfilter POSTROUTING (IPv4 + IPv6)
in the calling thread's network namespace, and reads cumulative per-flow counters.

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

import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from otel_kzt.agent import flowmap, links, netfilter, pins, probe
from otel_kzt.agent.flows import FlowCounters, FlowKey, Snapshot
from otel_kzt.agent.flowtables import DYING_SIZE, EVICT_BATCH, FlowTables, boot_to_unix_offset
from otel_kzt.errors import ConfigError, KernelUnsupported, ProgramLoadError

log = logging.getLogger(__name__)

LINK_PRIORITY = links.LINK_PRIORITY  # re-exported: the bench attaches its floor next to it
DISPATCH_VERSION = 1  # bump when kzt_dispatch changes: its links are then replaced, not adopted
META_COUNTER_HASH, META_DISPATCH_VERSION, META_NETNS_COOKIE, META_BOOT_TO_UNIX = 0, 1, 2, 3


@dataclass(frozen=True)
class DatapathConfig:
    node_name: str
    pin: bool = True  # False: detach on close()
    map_size: int = 65536  # flow map entries, per address family (IPv4 and IPv6 maps)
    ephemeral_min: int = 32768  # ephemeral port range: never in a key
    ephemeral_max: int = 65535
    pin_root: str = pins.DEFAULT_PIN_ROOT  # pins under <pin_root>/<pins.pin_dir_name(node_name)>/

    def validate(self) -> None:
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
        self._features: probe.Features | None = None
        self._cflags: list[str] = []
        self._bpf: Any = None
        self._evict_fd = -1
        self._link_fds: list[int] = []
        self._lock = threading.Lock()
        self._evicted: dict[FlowKey, FlowCounters] = {}
        self._seen: dict[FlowKey, tuple[int, int]] = {}  # key -> (packets, unix ns when they changed)
        self._tables: FlowTables | None = None

    # --- start -----------------------------------------------------------------------------------------

    def _build_flags(self) -> list[str]:
        if self._features is None:
            self._features = probe.probe()  # BTF is world-readable: --print-bpf needs no root
        c = self.config
        return probe.flow_cflags(
            self._features,
            map_size=c.map_size,
            ephemeral_min=c.ephemeral_min,
            ephemeral_max=c.ephemeral_max,
            evict_batch=EVICT_BATCH,
            dying_size=DYING_SIZE,
            pin_dir=str(self._dir) if c.pin else None,
        )

    def bpf_source(self) -> str:
        """The final C (flags, header, program), for a `--print-bpf` switch."""
        return probe.final_source(self._cflags or self._build_flags())

    def start(self) -> None:
        """Probe, compile, load, attach (or adopt what is pinned). Undoes a half-finished start."""
        with self._lock:
            if self._bpf is not None:
                return
            probe.require_root()
            probe.require_bcc()
            self._cflags = self._build_flags()
            if self.config.pin:
                pins.ensure_bpffs(self.config.pin_root)
                self._reset_if_incompatible()
                pins.make_node_dir(self._dir)
            try:
                self._load()
                self._finish_leftover_evictions()
            except BaseException:
                self._close_locked(detach=not self.config.pin)
                raise

    def _reset_if_incompatible(self) -> None:
        for layout in flowmap.LAYOUTS.values():
            try:
                fd = netfilter.obj_get(str(self._dir / layout.map_name))
            except FileNotFoundError:
                continue
            try:
                info = netfilter.map_info(fd)
            finally:
                os.close(fd)
            want = (layout.key.size, layout.value.size, self.config.map_size)
            got = (info.key_size, info.value_size, info.max_entries)
            if got != want:
                log.warning(
                    "pinned %s (key, value, entries)=%s, want %s: resetting node=%s",
                    layout.map_name,
                    got,
                    want,
                    self.config.node_name,
                )
                pins.cleanup(self.config.node_name, self.config.pin_root)
                return

    def _compile(self) -> Any:
        from bcc import BPF

        try:
            return BPF(src_file=str(probe.FLOW_SOURCE).encode(), cflags=self._cflags)
        except Exception as exc:  # bcc raises bare Exception
            raise ProgramLoadError(f"compiling {probe.FLOW_SOURCE} failed: {exc}") from exc

    def _load_func(self, name: str) -> int:
        try:
            fn = self._bpf.load_func(
                name.encode(), netfilter.BPF_PROG_TYPE_NETFILTER, attach_type=netfilter.BPF_NETFILTER
            )
        except Exception as exc:  # bcc raises bare Exception; the verifier log went to stderr
            raise ProgramLoadError(f"loading {name} failed (verifier log above): {exc}") from exc
        return int(fn.fd)

    def _load(self) -> None:
        self._bpf = self._compile()
        dispatch_fd = self._load_func("kzt_dispatch")
        self._evict_fd = self._load_func("kzt_evict") if self._features and self._features.test_run else -1
        meta = self._bpf[b"meta"]
        want_hash = probe.source_hash(self._cflags)
        current = self.config.pin and meta[ctypes.c_uint32(META_COUNTER_HASH)].value == want_hash
        if not (current and self._counter_installed()):
            counter_fd = self._load_func("kzt_count")
            # One atomic update: each packet runs either the old counter or the new one, never both.
            self._bpf[b"progs"][ctypes.c_int(0)] = ctypes.c_int(counter_fd)
            meta[ctypes.c_uint32(META_COUNTER_HASH)] = ctypes.c_uint64(want_hash)
            log.info("flow counter installed node=%s hash=%016x", self.config.node_name, want_hash)
        else:
            log.info("flow counter adopted unchanged node=%s hash=%016x", self.config.node_name, want_hash)
        # Pinned links are adopted only when they run the same dispatcher in this very namespace: after
        # a crash the node's namespace may have been re-created, and a link of a gone namespace counts
        # nothing.
        cookie = links.current_netns_cookie()
        adopt = (
            meta[ctypes.c_uint32(META_DISPATCH_VERSION)].value == DISPATCH_VERSION
            and meta[ctypes.c_uint32(META_NETNS_COOKIE)].value == cookie
        )
        for pf, name in pins.LINK_NAMES.items():
            path = str(self._dir / name) if self.config.pin else None
            self._link_fds.append(links.attach_or_adopt(dispatch_fd, pf, path, adopt=adopt))
        meta[ctypes.c_uint32(META_DISPATCH_VERSION)] = ctypes.c_uint64(DISPATCH_VERSION)
        meta[ctypes.c_uint32(META_NETNS_COOKIE)] = ctypes.c_uint64(cookie)
        self._tables = FlowTables(self._bpf, self.config.map_size, self._evict_fd, self._boot_offset(meta))

    def _boot_offset(self, meta: Any) -> int:
        """The datapath's boot-time -> Unix offset: the pinned one, or a new one stored for the next."""
        offset = int(meta[ctypes.c_uint32(META_BOOT_TO_UNIX)].value)
        if offset == 0:  # a fresh map (the kernel zero-fills arrays): this datapath's first start
            offset = boot_to_unix_offset()
            meta[ctypes.c_uint32(META_BOOT_TO_UNIX)] = ctypes.c_uint64(offset)
            log.info("boot-to-unix offset recorded node=%s offset_ns=%d", self.config.node_name, offset)
        return offset

    def _counter_installed(self) -> bool:
        try:
            self._bpf[b"progs"][ctypes.c_int(0)]
        except KeyError:
            return False
        return True

    # --- read --------------------------------------------------------------------------------------------

    def _tables_or_raise(self) -> FlowTables:
        if self._tables is None:
            raise KernelUnsupported("datapath not started")
        return self._tables

    def snapshot(self) -> Snapshot:
        """Cumulative counters of every flow, the overflow bucket and the counted losses."""
        with self._lock:
            tables = self._tables_or_raise()
            raw = {layout: tables.read(layout) for layout in flowmap.LAYOUTS.values()}
            offset, now = tables.boot_offset, time.time_ns()
            flows: dict[FlowKey, FlowCounters] = {}
            seen: dict[FlowKey, tuple[int, int]] = {}
            for layout, entries in raw.items():
                for raw_key, (nbytes, packets, first_boot, _dead) in entries.items():
                    key = flowmap.decode_key(layout, raw_key)
                    # The kernel keeps no last-seen time (a clock read per packet): the snapshot that
                    # first saw the current packet count stands in for it.
                    previous = self._seen.get(key)
                    seen[key] = previous if previous and previous[0] == packets else (packets, now)
                    flows[key] = FlowCounters(nbytes, packets, first_boot + offset, seen[key][1])
            self._seen = seen
            overflow_bytes, overflow_packets = tables.percpu_sums("overflow", 0)
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
            )

    # --- evict -------------------------------------------------------------------------------------------

    def evict(self, keys: Iterable[FlowKey]) -> int:
        """Remove flows without losing a byte; their final counters appear in the next `Snapshot.evicted`.

        Packets that race with the eviction are added to their flow's final value (and counted in
        `Snapshot.eviction_races`); a packet after the eviction starts the flow anew."""
        by_layout: dict[flowmap.Layout, list[bytes]] = {layout: [] for layout in flowmap.LAYOUTS.values()}
        for key in dict.fromkeys(keys):
            by_layout[flowmap.LAYOUTS[key.family]].append(flowmap.encode_key(key))
        with self._lock:
            tables = self._tables_or_raise()
            if self._evict_fd < 0:
                raise KernelUnsupported(
                    "eviction needs BPF_PROG_TEST_RUN for netfilter programs (Linux >= 6.6)"
                )
            final = tables.evict(by_layout)
            for key, counters in final.items():
                last = self._seen.pop(key, (0, counters.last_seen_unix_ns))[1]
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
        netfilter.synchronize_rcu()
        finals = {layout: tables.collect_dead(layout, raw_keys) for layout, raw_keys in dead.items()}
        netfilter.synchronize_rcu()
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
        for fd in self._link_fds:
            if detach:
                netfilter.link_detach(fd)
            os.close(fd)
        self._link_fds = []
        self._tables = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._evict_fd = -1


def cleanup(node_name: str, pin_root: str = pins.DEFAULT_PIN_ROOT) -> None:
    """Detach and unpin everything of one node (uninstall, demo, tests)."""
    pins.cleanup(node_name, pin_root)
