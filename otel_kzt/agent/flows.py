"""Typed values read out of the kernel flow map: what the datapath hands to the exporter.

The layout mirrors `otel_kzt/agent/datapath/bpf/flow.h`. Addresses are kept as raw bytes (4 or 16) so
the hot path never formats an address it has formatted before; the exporter caches per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

AF_INET = 4
AF_INET6 = 6


@dataclass(frozen=True, slots=True)
class FlowKey:
    family: int  # AF_INET (4) or AF_INET6 (6)
    src: bytes  # 4 or 16 bytes
    dst: bytes
    proto: int  # IANA protocol number
    src_port: int  # 0 unless the source is the listening side
    dst_port: int  # 0 unless the destination is the listening side (or the port is unknown)


@dataclass(frozen=True, slots=True)
class FlowCounters:
    bytes: int  # cumulative since first_seen
    packets: int
    first_seen_unix_ns: int  # wall clock, derived from the kernel timestamp kept in the map
    last_seen_unix_ns: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read of the datapath: cumulative per-flow counters plus the counted losses."""

    flows: dict[FlowKey, FlowCounters]
    overflow_bytes: int  # bytes of flows that did not fit in the map (cumulative)
    overflow_packets: int
    capacity: int  # flow map size
    taken_unix_ns: int
    # Added by the datapath (defaults keep older constructors working):
    insert_failures: int = 0  # packets that found the map full (their bytes are in overflow_*)
    eviction_races: int = 0  # packets that raced with their flow's eviction (kept in its evicted value)
    # Flows removed by Datapath.evict() since the previous snapshot, with their final cumulative counters
    # (including any packet that arrived between the last read and the eviction): report them once more.
    evicted: dict[FlowKey, FlowCounters] = field(default_factory=dict)


class FlowReader(Protocol):
    """The seam between the kernel and the exporter (a fake in unit tests, the bcc datapath for real)."""

    def snapshot(self) -> Snapshot: ...
