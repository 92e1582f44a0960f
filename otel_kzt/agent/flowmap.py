"""The flow map's binary layout (mirror of `bpf/flow.h`) and its decoding into `flows.FlowKey`.

Kept apart from the loader so the layout can be unit-tested without a kernel.
"""

from __future__ import annotations

import struct
from typing import Final

from otel_kzt.agent.flows import AF_INET, AF_INET6, FlowKey

# struct flow_key: family u8, proto u8, port_side u8, pad u8, port u16, pad u16, src[16], dst[16]
KEY_FORMAT: Final = struct.Struct("<BBBxHxx16s16s")
KEY_SIZE: Final = KEY_FORMAT.size  # 40
# struct flow_value: bytes u64, packets u64, first_seen_ns u64, dead u32, pad u32, key (40)
VALUE_FORMAT: Final = struct.Struct("<QQQIxxxx40s")
VALUE_SIZE: Final = VALUE_FORMAT.size  # 72
# struct overflow_value: bytes u64, packets u64 (per CPU)
OVERFLOW_FORMAT: Final = struct.Struct("<QQ")

PORT_NONE, PORT_SRC, PORT_DST = 0, 1, 2

# bpf/flow.h KZT_STAT_*
STAT_INSERT_FAILED, STAT_EVICT_RACE, STAT_NOT_IP, STAT_READ_FAILED = 0, 1, 2, 3
STAT_MAX: Final = 4


def decode_key(raw: bytes | memoryview, offset: int = 0) -> FlowKey:
    family, proto, side, port, src, dst = KEY_FORMAT.unpack_from(raw, offset)
    width = 4 if family == AF_INET else 16
    return FlowKey(
        family=family,
        src=src[:width],
        dst=dst[:width],
        proto=proto,
        src_port=port if side == PORT_SRC else 0,
        dst_port=port if side == PORT_DST else 0,
    )


def encode_key(key: FlowKey) -> bytes:
    if key.family not in (AF_INET, AF_INET6):
        raise ValueError(f"unknown address family {key.family}")
    if key.src_port and key.dst_port:
        raise ValueError("a flow key keeps at most one port (the listening side's)")
    side, port = PORT_NONE, 0
    if key.src_port:
        side, port = PORT_SRC, key.src_port
    elif key.dst_port:
        side, port = PORT_DST, key.dst_port
    return KEY_FORMAT.pack(
        key.family, key.proto, side, port, key.src.ljust(16, b"\0"), key.dst.ljust(16, b"\0")
    )


def decode_value(raw: bytes | memoryview, offset: int = 0) -> tuple[int, int, int, bool]:
    """(bytes, packets, first_seen boot-time ns, dead) of one flow value."""
    nbytes, packets, first_seen, dead, _key = VALUE_FORMAT.unpack_from(raw, offset)
    return nbytes, packets, first_seen, bool(dead)
