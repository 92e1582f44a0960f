"""Typed values read out of the kernel flow map: what the datapath hands to the exporter.

The layout mirrors `otel_kzt/agent/datapath/bpf/flow.h`. Addresses are kept as raw bytes (4 or 16) so
the hot path never formats an address it has formatted before; the exporter caches per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

AF_INET = 4
AF_INET6 = 6

# How a packet came to the hook (bpf/flow.h KZT_ORIGIN_*): the source is decided by the path (DESIGN §3).
ORIGIN_UNKNOWN = 0  # forwarded with its sender's source, or the mode cannot tell: decided by the addresses
ORIGIN_LOCAL = 1  # sent by the node's own stack: the node's
ORIGIN_REWRITTEN = 2  # routed through with a source someone rewrote (IPVS's un-NAT to a VIP): never ours
ORIGIN_SNAT = 3  # routed through, rewritten both ways by this node's NAT (the NodePort hop): the node's


@dataclass(frozen=True, slots=True)
class FlowKey:
    family: int  # AF_INET (4) or AF_INET6 (6)
    src: bytes  # 4 or 16 bytes
    dst: bytes
    proto: int  # IANA protocol number
    src_port: int  # 0 unless the source is the listening side
    dst_port: int  # 0 unless the destination is the listening side (or the port is unknown)
    origin: int = ORIGIN_UNKNOWN  # ORIGIN_*


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
    # When the datapath's maps were made (pinned: survives agent restarts), the start of the cumulative
    # overflow counters; 0 when unknown (then the process start stands in).
    started_unix_ns: int = 0


class FlowReader(Protocol):
    """The seam between the kernel and the exporter (a fake in unit tests, the bcc datapath for real)."""

    def snapshot(self) -> Snapshot: ...
