"""Map-level work on a loaded datapath: batch reads of the flow maps, per-CPU sums, and the lossless
eviction protocol (mark dead in the kernel, wait a grace period, read the final value, delete).

`FlowTables` wraps the bcc module of `bpf/flow.c`; `Datapath` owns the lifecycle and the locking.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from otel_kzt.agent import flowmap, netfilter
from otel_kzt.agent.flowmap import Layout
from otel_kzt.agent.flows import FlowCounters, FlowKey

log = logging.getLogger(__name__)

EVICT_BATCH = 64  # keys per evictor run (KZT_EVICT_BATCH)
DYING_SIZE = 4096  # flows whose racing packets can be kept apart at once (KZT_DYING_SIZE); then overflow
EVICT_RESULT_INDEX = 2  # evict_count[2]: how many flows the evictor marked

RawFlows = dict[bytes, tuple[int, int, int, bool]]  # raw key -> (bytes, packets, first_seen boot ns, dead)


def boot_to_unix_offset() -> int:
    """Add to a CLOCK_BOOTTIME timestamp (what the kernel stores) to get Unix time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class FlowTables:
    def __init__(self, bpf: Any, map_size: int, evict_fd: int, boot_offset: int) -> None:
        self._bpf = bpf
        self._evict_fd = evict_fd
        self.boot_offset = boot_offset  # fixed per datapath (pinned): first-seen times never wobble
        # Batch-read buffers sized for a full map, allocated once.
        self._buffers = {
            layout.family: (
                ctypes.create_string_buffer(map_size * layout.key.size),
                ctypes.create_string_buffer(map_size * layout.value.size),
            )
            for layout in flowmap.LAYOUTS.values()
        }

    def read(self, layout: Layout) -> RawFlows:
        keys, values = self._buffers[layout.family]
        fd = self._bpf[layout.map_name.encode()].map_fd
        count = netfilter.map_lookup_batch(fd, keys, values, layout.key.size, layout.value.size)
        kview, vview, ks, vs = memoryview(keys), memoryview(values), layout.key.size, layout.value.size
        return {
            bytes(kview[i * ks : (i + 1) * ks]): flowmap.decode_value(layout, vview, i * vs)
            for i in range(count)
        }

    def percpu_sums(self, table: str, index: int) -> list[int]:
        per_cpu = self._bpf[table.encode()][ctypes.c_uint32(index)]
        if hasattr(per_cpu[0], "bytes"):
            return [sum(v.bytes for v in per_cpu), sum(v.packets for v in per_cpu)]
        return [sum(int(v) for v in per_cpu)]

    # --- eviction --------------------------------------------------------------------------------------

    def mark_dead(self, layout: Layout, batch: list[bytes]) -> int:
        """Run the evictor on up to EVICT_BATCH keys of one family; returns how many it marked."""
        table, count = self._bpf[layout.evict_keys.encode()], self._bpf[b"evict_count"]
        for i, raw in enumerate(batch):
            table[ctypes.c_uint32(i)] = table.Leaf.from_buffer_copy(raw)
        for layout_other in flowmap.LAYOUTS.values():
            n = len(batch) if layout_other is layout else 0
            count[ctypes.c_uint32(layout_other.evict_count_index)] = ctypes.c_uint32(n)
        netfilter.test_run(self._evict_fd)
        return int(count[ctypes.c_uint32(EVICT_RESULT_INDEX)].value)

    def evict(self, by_layout: dict[Layout, list[bytes]]) -> dict[FlowKey, FlowCounters]:
        """The whole protocol; returns the final counters of the flows it removed.

        1. the evictor marks the flows dead: from then on their packets go to dying4/6;
        2. grace period: no program still adds to a flow it saw alive; read the final values, delete;
        3. grace period: no program still holds a deleted flow; add and delete their dying entries.
        """
        for layout, raw_keys in by_layout.items():
            for start in range(0, len(raw_keys), EVICT_BATCH):
                self.mark_dead(layout, raw_keys[start : start + EVICT_BATCH])
        netfilter.synchronize_rcu()
        finals = {layout: self.collect_dead(layout, raw_keys) for layout, raw_keys in by_layout.items()}
        netfilter.synchronize_rcu()
        result: dict[FlowKey, FlowCounters] = {}
        for layout, final in finals.items():
            result.update(self.fold_dying(layout, final))
        return result

    def collect_dead(self, layout: Layout, raw_keys: Iterable[bytes]) -> dict[bytes, FlowCounters]:
        """Final counters of dead flows, which are then deleted (after the first grace period)."""
        flows = self._bpf[layout.map_name.encode()]
        offset, now = self.boot_offset, time.time_ns()
        final: dict[bytes, FlowCounters] = {}
        for raw in raw_keys:
            ckey = flows.Key.from_buffer_copy(raw)
            leaf = flows.get(ckey)
            if leaf is None:
                continue
            nbytes, packets, first_boot, dead = flowmap.decode_value(layout, bytes(leaf))
            if not dead:
                continue  # inserted again after the evictor ran: a live flow, leave it alone
            final[raw] = FlowCounters(nbytes, packets, first_boot + offset, now)
            del flows[ckey]
        return final

    def fold_dying(self, layout: Layout, final: dict[bytes, FlowCounters]) -> dict[FlowKey, FlowCounters]:
        """Add each flow's dying entry (packets that raced with its eviction) and delete it (after the
        second grace period, when nothing can add to it any more)."""
        dying = self._bpf[layout.dying_name.encode()]
        result: dict[FlowKey, FlowCounters] = {}
        for raw, counters in final.items():
            ckey = dying.Key.from_buffer_copy(raw)
            extra = dying.get(ckey)
            total = counters
            if extra is not None:
                total = replace(
                    counters, bytes=counters.bytes + extra.bytes, packets=counters.packets + extra.packets
                )
                del dying[ckey]
            result[flowmap.decode_key(layout, raw)] = total
        return result

    def sweep_dying(self, layout: Layout) -> dict[FlowKey, FlowCounters]:
        """Dying entries left by an agent that died mid-eviction (after a grace period): the remains
        of flows already deleted, reported as evicted flows of their own."""
        dying = self._bpf[layout.dying_name.encode()]
        now = time.time_ns()
        left = {bytes(k): (int(v.bytes), int(v.packets)) for k, v in dying.items()}
        for raw in left:
            del dying[dying.Key.from_buffer_copy(raw)]
        return {flowmap.decode_key(layout, raw): FlowCounters(b, p, now, now) for raw, (b, p) in left.items()}
