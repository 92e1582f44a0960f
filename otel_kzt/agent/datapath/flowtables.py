"""Map-level work on a loaded datapath: batch reads of the flow maps, per-CPU sums, emptying every CPU's
write-combining slot into them (`flush`, before each read), and the lossless eviction protocol (mark dead
in the kernel, wait a grace period, read the final value, delete).

`FlowTables` works on the maps of `bpf/count.h` by fd (`bpfmap`: raw `bpf(2)`, no bcc in this process);
`Datapath` owns the lifecycle and the locking.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

from otel_kzt.agent.datapath import bpfsys, flowmap
from otel_kzt.agent.datapath.bpfmap import BpfMap, possible_cpus, u32
from otel_kzt.agent.datapath.bpfsys import BpfCallError
from otel_kzt.agent.datapath.flowmap import Layout
from otel_kzt.agent.flows import FlowCounters, FlowKey

log = logging.getLogger(__name__)

EVICT_BATCH = 64  # keys per evictor run (KZT_EVICT_BATCH)
DYING_SIZE = 4096  # flows whose racing packets can be kept apart at once (KZT_DYING_SIZE); then overflow
EVICT_RESULT_INDEX = 2  # evict_count[2]: how many flows the evictor marked
READ_CHUNK = 8192  # flows per batch read: a fixed ~1 MB of buffers instead of a full map's worth
FLUSH_TRIES = 200  # runs of kzt_flush per CPU while its slot is busy (nanoseconds, unless a run inside
FLUSH_WAIT_S = 50e-6  # it was preempted), this far apart: ~10 ms, then the slot waits for the next read

RawFlows = dict[bytes, tuple[int, int, int, bool]]  # raw key -> (bytes, packets, first_seen boot ns, dead)


def delete_all(table: BpfMap, raw_keys: list[bytes]) -> None:
    """Delete keys that are there, one batch call for all; a key found gone stops the batch (ENOENT), and
    the rest go one by one."""
    if not raw_keys:
        return
    size = table.key_size
    done = bpfsys.map_delete_batch(
        table.fd, ctypes.create_string_buffer(b"".join(raw_keys), len(raw_keys) * size), len(raw_keys)
    )
    for raw in raw_keys[done:]:
        table.delete(raw)


def read_dying(dying: BpfMap) -> dict[bytes, tuple[int, int]]:
    """A dying map's entries (raw key -> bytes, packets), in batch reads."""
    ks, vs = dying.key_size, dying.value_size
    return {
        bytes(keys[i * ks : (i + 1) * ks]): flowmap.OVERFLOW_FORMAT.unpack_from(values, i * vs)
        for keys, values, count in bpfsys.map_batches(dying.fd, ks, vs, READ_CHUNK)
        for i in range(count)
    }


def boot_to_unix_offset() -> int:
    """Add to a CLOCK_BOOTTIME timestamp (what the kernel stores) to get Unix time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class FlowTables:
    def __init__(
        self, maps: dict[str, BpfMap], map_size: int, evict_fd: int, boot_offset: int, flush_fd: int = -1
    ) -> None:
        self._maps = maps
        self._evict_fd = evict_fd
        self._flush_fd = flush_fd
        self._cpus = range(possible_cpus()) if flush_fd >= 0 else range(0)
        self.boot_offset = boot_offset  # fixed per datapath (pinned): first-seen times never wobble
        self._chunk = min(map_size, READ_CHUNK)

    def batches(self, layout: Layout) -> Iterator[tuple[memoryview, memoryview, int]]:
        """The flow map in chunks (keys, values, count); the buffers are reused: decode before the next."""
        yield from bpfsys.map_batches(
            self._maps[layout.map_name].fd, layout.key.size, layout.value.size, self._chunk
        )

    def read(self, layout: Layout) -> RawFlows:
        ks, vs = layout.key.size, layout.value.size
        return {
            bytes(keys[i * ks : (i + 1) * ks]): flowmap.decode_value(layout, values, i * vs)
            for keys, values, count in self.batches(layout)
            for i in range(count)
        }

    def flush(self) -> None:
        """Empty every CPU's write-combining slot into the maps (count.h, KZT_WC): what is read after
        holds every packet counted before. The map only grows by this, so a read never counts a packet
        twice. A slot still busy after FLUSH_TRIES runs (its run preempted that long) keeps its counts
        for the next read (logged), and an offline CPU's until it is back: late, never lost."""
        for cpu in self._cpus:
            for _ in range(FLUSH_TRIES):
                try:
                    if bpfsys.test_run_on_cpu(self._flush_fd, cpu) == 0:
                        break
                except BpfCallError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: the CPU is offline
                        raise
                    break
                time.sleep(FLUSH_WAIT_S)
            else:
                log.warning(
                    "write-combining slot of CPU %d stayed busy: its counts wait for a later read", cpu
                )

    def percpu_sums(self, table: str, index: int) -> list[int]:
        """Each u64 field of a per-CPU entry summed over CPUs: [bytes, packets] or [count]."""
        return self._maps[table].percpu_u64_sums(u32(index))

    # --- eviction --------------------------------------------------------------------------------------

    def mark_dead(self, layout: Layout, batch: list[bytes]) -> int:
        """Run the evictor on up to EVICT_BATCH keys of one family, after the slots are flushed (a flow
        whose packets all wait in a slot is not in the map yet); returns how many it marked."""
        self.flush()
        return self._mark(layout, batch)

    def _mark(self, layout: Layout, batch: list[bytes]) -> int:
        table, count = self._maps[layout.evict_keys], self._maps["evict_count"]
        if batch:  # the listed keys in one call, not one per key
            indices = b"".join(u32(i) for i in range(len(batch)))
            bpfsys.map_update_batch(
                table.fd,
                ctypes.create_string_buffer(indices, len(indices)),
                ctypes.create_string_buffer(b"".join(batch), len(batch) * table.value_size),
                len(batch),
            )
        for layout_other in flowmap.LAYOUTS.values():
            n = len(batch) if layout_other is layout else 0
            count.update(u32(layout_other.evict_count_index), u32(n))
        bpfsys.test_run(self._evict_fd)
        marked = count.lookup(u32(EVICT_RESULT_INDEX))
        return int.from_bytes(marked, "little") if marked is not None else 0

    def evict(self, by_layout: dict[Layout, list[bytes]]) -> dict[FlowKey, FlowCounters]:
        """The whole protocol; returns the final counters of the flows it removed.

        1. the evictor marks the flows dead: from then on their packets go to dying4/6;
        2. grace period: no program still adds to a flow it saw alive; the slots are flushed (what they
           hold of a dead flow goes to its dying entry); read the final values, delete;
        3. grace period: no program still holds a deleted flow; add and delete their dying entries.
        A flow's packets still in a slot after step 2 reach the map later, as a packet after the eviction.
        """
        self.flush()
        for layout, raw_keys in by_layout.items():
            for start in range(0, len(raw_keys), EVICT_BATCH):
                self._mark(layout, raw_keys[start : start + EVICT_BATCH])
        bpfsys.synchronize_rcu()
        self.flush()
        finals = {layout: self.collect_dead(layout, raw_keys) for layout, raw_keys in by_layout.items()}
        bpfsys.synchronize_rcu()
        result: dict[FlowKey, FlowCounters] = {}
        for layout, final in finals.items():
            result.update(self.fold_dying(layout, final))
        return result

    def collect_dead(self, layout: Layout, raw_keys: Iterable[bytes]) -> dict[bytes, FlowCounters]:
        """Final counters of dead flows, which are then deleted (after the first grace period)."""
        flows = self._maps[layout.map_name]
        offset, now = self.boot_offset, time.time_ns()
        final: dict[bytes, FlowCounters] = {}
        for raw in raw_keys:
            value = flows.lookup(raw)
            if value is None:
                continue
            nbytes, packets, first_boot, dead = flowmap.decode_value(layout, value)
            if not dead:
                continue  # inserted again after the evictor ran: a live flow, leave it alone
            final[raw] = FlowCounters(nbytes, packets, first_boot + offset, now)
        # Dead since the grace period: nothing adds to them any more, so their values are final whether
        # they go now or after the last lookup.
        delete_all(flows, list(final))
        return final

    def fold_dying(self, layout: Layout, final: dict[bytes, FlowCounters]) -> dict[FlowKey, FlowCounters]:
        """Add each flow's dying entry (packets that raced with its eviction) and delete it (after the
        second grace period, when nothing can add to it any more)."""
        dying = self._maps[layout.dying_name]
        # One batch read of the dying map (at most DYING_SIZE entries, most often none) instead of a
        # lookup per flow; entries of other keys are left as they are.
        extras = {raw: v for raw, v in read_dying(dying).items() if raw in final} if final else {}
        result: dict[FlowKey, FlowCounters] = {}
        for raw, counters in final.items():
            extra = extras.get(raw)
            total = counters
            if extra is not None:
                nbytes, packets = extra
                total = replace(counters, bytes=counters.bytes + nbytes, packets=counters.packets + packets)
            result[FlowKey.of_raw(raw)] = total
        delete_all(dying, list(extras))  # after the read: a batch read needs a stable map
        return result

    def sweep_dying(self, layout: Layout) -> dict[FlowKey, FlowCounters]:
        """Dying entries left by an agent that died mid-eviction (after a grace period): the remains
        of flows already deleted, reported as evicted flows of their own."""
        dying = self._maps[layout.dying_name]
        now = time.time_ns()
        entries = read_dying(dying)
        delete_all(dying, list(entries))  # after the read: a batch read needs a stable map
        return {FlowKey.of_raw(raw): FlowCounters(b, p, now, now) for raw, (b, p) in entries.items()}
