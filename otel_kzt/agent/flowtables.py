"""Map-level work on a loaded datapath: batch reads of the flow maps, per-CPU sums, and the lossless
eviction protocol (mark dead in the kernel, wait a grace period, read the final value, delete).

`FlowTables` wraps the bcc module of `bpf/flow.c`; `Datapath` owns the lifecycle and the locking.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterable
from typing import Any

from otel_kzt.agent import flowmap, netfilter
from otel_kzt.agent.flowmap import Layout
from otel_kzt.agent.flows import FlowCounters, FlowKey

log = logging.getLogger(__name__)

EVICT_BATCH = 64  # keys per evictor run (KZT_EVICT_BATCH)
EVICT_RESULT_INDEX = 2  # evict_count[2]: how many flows the evictor marked

RawFlows = dict[bytes, tuple[int, int, int, bool]]  # raw key -> (bytes, packets, first_seen boot ns, dead)


def boot_to_unix_offset() -> int:
    """Add to a CLOCK_BOOTTIME timestamp (what the kernel stores) to get Unix time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class FlowTables:
    def __init__(self, bpf: Any, map_size: int, evict_fd: int) -> None:
        self._bpf = bpf
        self._evict_fd = evict_fd
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

    def collect_dead(self, layout: Layout, raw_keys: Iterable[bytes]) -> dict[FlowKey, FlowCounters]:
        """Final counters of dead flows, which are then deleted. Call after `netfilter.synchronize_rcu()`:
        from then on no program adds to a dead flow (racing packets went to the overflow bucket)."""
        flows = self._bpf[layout.map_name.encode()]
        offset, now = boot_to_unix_offset(), time.time_ns()
        final: dict[FlowKey, FlowCounters] = {}
        for raw in raw_keys:
            ckey = flows.Key.from_buffer_copy(raw)
            leaf = flows.get(ckey)
            if leaf is None:
                continue
            nbytes, packets, first_boot, dead = flowmap.decode_value(layout, bytes(leaf))
            if not dead:
                continue  # inserted again after the evictor ran: a live flow, leave it alone
            final[flowmap.decode_key(layout, raw)] = FlowCounters(nbytes, packets, first_boot + offset, now)
            del flows[ckey]
        return final
