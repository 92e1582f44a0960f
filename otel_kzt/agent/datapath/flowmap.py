"""The flow maps' binary layout (mirror of `bpf/flow.h`): map names, value formats, stats indexes.

IPv4 and IPv6 flows live in two maps (`flows4`, `flows6`) with keys of 12 and 36 bytes; a key is a
`flows.FlowKey` as read (its layout lives there). Kept apart from the loader so the layout can be
unit-tested without a kernel.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Final

from otel_kzt.agent.flows import AF_INET, AF_INET6, KEY_FORMATS

# flow.h KZT_STAT_*
STAT_INSERT_FAILED, STAT_EVICT_RACE, STAT_NOT_IP, STAT_READ_FAILED = 0, 1, 2, 3
STAT_MAX: Final = 4

OVERFLOW_FORMAT: Final = struct.Struct("<QQ")  # struct overflow_value: bytes, packets (per CPU)


@dataclass(frozen=True)
class Layout:
    """One family's map: its name in the C, key and value formats."""

    family: int
    map_name: str
    dying_name: str  # packets that raced with an eviction, per flow (struct overflow_value)
    evict_keys: str  # the evictor's command array for this family
    evict_count_index: int  # evict_count[i] holds how many keys are listed
    slot_name: str  # each CPU's write-combining slot (struct kzt_slot4/6: busy u64, key, bytes, packets)
    key: struct.Struct  # flows.KEY_FORMATS: proto u8, port_side u8, port u16, src, dst
    value: struct.Struct  # bytes u64, packets u64, first_seen_ns u64, dead u32, pad u32, key, pad u32

    @property
    def counts(self) -> struct.Struct:
        """A value's bytes, packets and first_seen_ns only, the rest skipped: what a snapshot reads (no
        objects made for the dead flag and the key copy, per flow and read)."""
        return _counts(self.value.size)

    @property
    def slot_size(self) -> int:
        return 8 + (self.key.size + 7) // 8 * 8 + 16

    @property
    def width(self) -> int:
        return 4 if self.family == AF_INET else 16


@functools.cache
def _counts(value_size: int) -> struct.Struct:
    return struct.Struct(f"<QQQ{value_size - 24}x")


V4: Final = Layout(
    AF_INET,
    "flows4",
    "dying4",
    "evict_keys4",
    0,
    "slot4",
    KEY_FORMATS[AF_INET],
    struct.Struct("<QQQIxxxx12sxxxx"),
)
V6: Final = Layout(
    AF_INET6,
    "flows6",
    "dying6",
    "evict_keys6",
    1,
    "slot6",
    KEY_FORMATS[AF_INET6],
    struct.Struct("<QQQIxxxx36sxxxx"),
)
LAYOUTS: Final = {AF_INET: V4, AF_INET6: V6}


def decode_value(layout: Layout, raw: bytes | memoryview, offset: int = 0) -> tuple[int, int, int, bool]:
    """(bytes, packets, first_seen boot-time ns, dead) of one flow value."""
    nbytes, packets, first_seen, dead, _key = layout.value.unpack_from(raw, offset)
    return nbytes, packets, first_seen, bool(dead)
