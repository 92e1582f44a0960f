"""Typed values read out of the kernel flow map: what the datapath hands to the exporter.

A `FlowKey` is the kernel's map key itself (the layout of `otel_kzt/agent/datapath/bpf/flow.h`, 12 bytes
for IPv4, 36 for IPv6): a bytes object, so the datapath keeps the key it read without decoding it, and
every dict of flows hashes it in C, once (a bytes hash is cached), 100,000 flows an interval. Its fields
are decoded when asked for, which the hot path does only for a flow it has not seen before. Addresses
stay raw bytes (4 or 16) so the exporter never formats an address it has formatted before.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final, Protocol

AF_INET = 4
AF_INET6 = 6

# How a packet came to the hook (bpf/flow.h KZT_ORIGIN_*): the source is decided by the path (DESIGN §3).
ORIGIN_UNKNOWN = 0  # forwarded with its sender's source, or the mode cannot tell: decided by the addresses
ORIGIN_LOCAL = 1  # sent by the node's own stack: the node's
ORIGIN_REWRITTEN = 2  # routed through with a source someone rewrote (IPVS's un-NAT to a VIP): never ours
ORIGIN_SNAT = 3  # routed through, rewritten both ways by this node's NAT (the NodePort hop): the node's


# The key's layout (bpf/flow.h struct flow_key4 / flow_key6): proto u8, port_side u8, port u16 (host
# order), src, dst. port_side holds the port's side (PORT_*) in bits 0-1 and the origin in bits 2-3.
KEY_FORMATS: Final = {AF_INET: struct.Struct("<BBH4s4s"), AF_INET6: struct.Struct("<BBH16s16s")}
PORT_NONE, PORT_SRC, PORT_DST = 0, 1, 2
PORT_MASK, ORIGIN_SHIFT = 3, 2
_FAMILY_BY_SIZE: Final = {fmt.size: family for family, fmt in KEY_FORMATS.items()}


class FlowKey(bytes):
    """One flow as the kernel keys it. `FlowKey(family, src, dst, proto, src_port, dst_port, origin)`
    checks its fields (ValueError naming what is wrong); `FlowKey.of_raw` takes a map key as read."""

    __slots__ = ()

    def __new__(  # noqa: PLR0917 (the fields in order, as the dataclass it replaced took them)
        cls,
        family: int,  # AF_INET (4) or AF_INET6 (6)
        src: bytes,  # 4 or 16 bytes
        dst: bytes,
        proto: int,  # IANA protocol number
        src_port: int = 0,  # 0 unless the source is the listening side
        dst_port: int = 0,  # 0 unless the destination is the listening side (or the port is unknown)
        origin: int = ORIGIN_UNKNOWN,  # ORIGIN_*
    ) -> FlowKey:
        layout = KEY_FORMATS.get(family)
        if layout is None:
            raise ValueError(f"unknown address family {family}")
        width = 4 if family == AF_INET else 16
        if len(src) != width or len(dst) != width:
            raise ValueError(f"IPv{family} addresses are {width} bytes")
        if src_port and dst_port:
            raise ValueError("a flow key keeps at most one port (the listening side's)")
        if not (0 <= proto <= 255 and 0 <= src_port <= 65535 and 0 <= dst_port <= 65535):
            raise ValueError(f"protocol or port out of range: {proto}, {src_port}, {dst_port}")
        if not ORIGIN_UNKNOWN <= origin <= ORIGIN_SNAT:
            raise ValueError(f"unknown origin {origin}")
        side = PORT_SRC if src_port else PORT_DST if dst_port else PORT_NONE
        raw = layout.pack(proto, side | origin << ORIGIN_SHIFT, src_port or dst_port, src, dst)
        return bytes.__new__(cls, raw)

    @classmethod
    def of_raw(cls, raw: bytes) -> FlowKey:
        """A key as the kernel map holds it (its size says the family)."""
        if len(raw) not in _FAMILY_BY_SIZE:
            raise ValueError(f"a flow key is 12 or 36 bytes, got {len(raw)}")
        return bytes.__new__(cls, raw)

    @property
    def family(self) -> int:
        return AF_INET if len(self) == 12 else AF_INET6

    @property
    def proto(self) -> int:
        return self[0]

    @property
    def origin(self) -> int:
        return self[1] >> ORIGIN_SHIFT

    @property
    def src_port(self) -> int:
        return int.from_bytes(self[2:4], "little") if self[1] & PORT_MASK == PORT_SRC else 0

    @property
    def dst_port(self) -> int:
        return int.from_bytes(self[2:4], "little") if self[1] & PORT_MASK == PORT_DST else 0

    @property
    def src(self) -> bytes:
        return self[4 : 4 + (len(self) - 4) // 2]

    @property
    def dst(self) -> bytes:
        return self[4 + (len(self) - 4) // 2 :]

    def __repr__(self) -> str:
        return (
            f"FlowKey(family={self.family}, src={self.src!r}, dst={self.dst!r}, proto={self.proto}, "
            f"src_port={self.src_port}, dst_port={self.dst_port}, origin={self.origin})"
        )


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


@dataclass(frozen=True, slots=True)
class DeviceCounts:
    """The devices a datapath counts at (tc: the hooked devices, followed while it runs), and the changes
    since the process started (the start's own choice not counted)."""

    hooked: int
    added: int
    removed: int
    covered: int  # chosen and not hooked: a VXLAN overlay whose packets the uplinks count inside (tc.py)


class FlowReader(Protocol):
    """The seam between the kernel and the exporter (a fake in unit tests, the bcc datapath for real)."""

    def snapshot(self) -> Snapshot: ...
