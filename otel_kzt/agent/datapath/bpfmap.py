"""BPF maps by file descriptor, with raw `bpf(2)` element calls: what the agent uses instead of bcc's tables.

The long-running agent never loads libbcc (about 100 MB of LLVM): a short-lived child compiles and loads
the datapath (`loader`) and hands the agent plain fds. Sizes and the map type come from the kernel
(`BPF_OBJ_GET_INFO_BY_FD`), so a per-CPU value is read as one slot per possible CPU.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct

from otel_kzt.agent.datapath import bpfsys
from otel_kzt.agent.datapath.bpfsys import BpfCallError

BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 1, 2, 3
BPF_ANY = 0
# Map types whose values hold one slot (rounded up to 8 bytes) per possible CPU.
PERCPU_TYPES = frozenset({5, 6, 10})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH


@functools.cache
def possible_cpus() -> int:
    """How many slots a per-CPU value has: the kernel sizes it by *possible* CPUs, not online ones."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


class BpfMap:
    """One map: lookup/update/delete of single elements by raw bytes. Owns (and closes) its fd."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        try:
            info = bpfsys.map_info(fd)
        except BaseException:
            self.close()
            raise
        self.map_type, self.max_entries = info.map_type, info.max_entries
        self.key_size, self.value_size = info.key_size, info.value_size
        self.percpu = info.map_type in PERCPU_TYPES
        slot = (info.value_size + 7) & ~7
        self._read_size = slot * possible_cpus() if self.percpu else info.value_size
        self.slot_size = slot if self.percpu else info.value_size

    def _call(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None, flags: int) -> bool:
        """False when the kernel answers ENOENT (no such element)."""
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, the map's are {self.key_size}")
        raw_key = ctypes.create_string_buffer(key, len(key))
        value_ptr = ctypes.addressof(value) if value is not None else 0
        # map_elem: map_fd u32, pad, key u64, value u64, flags u64
        attr = bpfsys.pack_attr("<IIQQQ", self.fd, 0, ctypes.addressof(raw_key), value_ptr, flags)
        try:
            bpfsys.bpf(cmd, attr, f"map {self.name}")
        except BpfCallError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def lookup(self, key: bytes) -> bytes | None:
        """The value (per-CPU maps: every CPU's slot, one after the other), or None."""
        value = ctypes.create_string_buffer(self._read_size)
        return value.raw if self._call(BPF_MAP_LOOKUP_ELEM, key, value, 0) else None

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size or self.percpu:
            raise ValueError(f"{self.name}: update takes one {self.value_size}-byte value (not per-CPU)")
        self._call(BPF_MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, len(value)), flags)

    def delete(self, key: bytes) -> bool:
        return self._call(BPF_MAP_DELETE_ELEM, key, None, 0)

    def percpu_u64_sums(self, key: bytes) -> list[int]:
        """Sum over CPUs of each u64 field of a per-CPU value (e.g. [bytes, packets])."""
        raw = self.lookup(key)
        fields = self.value_size // 8
        if raw is None:
            return [0] * fields
        fmt = struct.Struct(f"<{fields}Q")
        sums = [0] * fields
        for cpu in range(len(raw) // self.slot_size):
            for i, v in enumerate(fmt.unpack_from(raw, cpu * self.slot_size)):
                sums[i] += v
        return sums

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def u32(index: int) -> bytes:
    """An array map key."""
    return struct.pack("<I", index)
