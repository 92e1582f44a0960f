"""A small reader for the kernel's BTF (/sys/kernel/btf/vmlinux): struct member offsets and enum values.

The datapath reads `sk_buff` fields at the running kernel's offsets, not at those of whatever header tree
bcc compiles against (Debian's 6.1 headers on a 6.18 kernel). BTF is a flat, simple format: a header, a
type section of variable-length records, and a string section. We index it once per file and cache the
result per process (the file only changes with the kernel).

Only what the datapath needs is decoded: struct/union members (descending into anonymous members, as
`sk_buff` hides most fields in anonymous unions and `struct_group`s), enum values, and whether a named
type or function exists (feature probes).
"""

from __future__ import annotations

import copy
import functools
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from otel_kzt.errors import KernelUnsupported

log = logging.getLogger(__name__)

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow the 12-byte common record: fixed extra + per-member size (times vlen).
_EXTRA: dict[int, tuple[int, int]] = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    offset_bits: int
    type_id: int
    bitfield_size: int  # 0 unless a bitfield


class Btf:
    """An indexed BTF blob. Type ids start at 1 (0 is `void`)."""

    def __init__(self, data: bytes) -> None:
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise KernelUnsupported(f"not a BTF blob (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        self._offsets: list[int] = [0]  # record offset per type id; id 0 is void
        self._by_name: dict[tuple[int, str], list[int]] = {}
        self._enumerators: dict[str, int] | None = None
        self._absent: frozenset[str] = frozenset()
        self._index()

    def _index(self) -> None:
        data, pos, end = self._data, self._types_start, self._types_end
        unpack = struct.unpack_from
        while pos < end:
            name_off, info = unpack("<II", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            fixed, per_member = _EXTRA.get(kind, (0, 0))
            self._offsets.append(pos)
            if name_off:
                key = (kind, self.string(name_off))
                self._by_name.setdefault(key, []).append(len(self._offsets) - 1)
            pos += 12 + fixed + per_member * vlen

    def string(self, offset: int) -> str:
        start = self._str_start + offset
        stop = self._data.index(b"\0", start, self._str_end)
        return self._data[start:stop].decode()

    def _record(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(pos, name_off, kind, vlen, kflag) of a type."""
        pos = self._offsets[type_id]
        name_off, info = struct.unpack_from("<II", self._data, pos)
        return pos, name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31

    def find(self, kind: int, name: str) -> int | None:
        ids = self._by_name.get((kind, name))
        return ids[0] if ids else None

    def has_type(self, kind: int, name: str) -> bool:
        return (kind, name) in self._by_name

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        while True:
            pos, _name, kind, _vlen, _kflag = self._record(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = struct.unpack_from("<I", self._data, pos + 8)[0]

    def members(self, type_id: int) -> list[Member]:
        pos, _name, kind, vlen, kflag = self._record(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise KernelUnsupported(f"BTF type {type_id} is not a struct or union")
        result = []
        for i in range(vlen):
            name_off, member_type, offset = struct.unpack_from("<III", self._data, pos + 12 + 12 * i)
            bits, size = (offset & 0xFFFFFF, offset >> 24) if kflag else (offset, 0)
            result.append(Member(self.string(name_off) if name_off else "", bits, member_type, size))
        return result

    def size_of(self, type_id: int) -> int:
        pos, _name, kind, _vlen, _kflag = self._record(self.resolve(type_id))
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:  # element type, index type, element count follow the common record
            elem, _index, count = struct.unpack_from("<III", self._data, pos + 12)
            return self.size_of(elem) * int(count)
        return int(struct.unpack_from("<I", self._data, pos + 8)[0])

    def _find_member(self, type_id: int, name: str) -> tuple[int, Member] | None:
        """Depth-first through anonymous members: (absolute bit offset, member)."""
        for member in self.members(type_id):
            if member.name == name:
                return member.offset_bits, member
            if not member.name:
                inner = self.resolve(member.type_id)
                found = self._find_member(inner, name)
                if found is not None:
                    return member.offset_bits + found[0], found[1]
        return None

    def field(self, struct_name: str, field_name: str) -> tuple[int, int]:
        """(byte offset, byte size) of `struct_name.field_name`; raises KernelUnsupported if absent."""
        type_id = self.find(KIND_STRUCT, struct_name)
        if type_id is None:
            raise KernelUnsupported(f"kernel BTF has no struct {struct_name}")
        found = self._find_member(type_id, field_name)
        if found is None:
            raise KernelUnsupported(f"kernel BTF: struct {struct_name} has no field {field_name}")
        bits, member = found
        if member.bitfield_size or bits % 8:
            raise KernelUnsupported(f"kernel BTF: {struct_name}.{field_name} is a bitfield")
        return bits // 8, self.size_of(member.type_id)

    def enumerator(self, member_name: str) -> int | None:
        """The value of an enumerator wherever it is declared (many kernel constants, like the SKB_GSO_*
        bits, live in anonymous enums); None when absent. Indexed on first use."""
        if self._enumerators is None:
            self._enumerators = {}
            for type_id in range(1, len(self._offsets)):
                pos, _name, kind, vlen, _kflag = self._record(type_id)
                if kind != KIND_ENUM:
                    continue
                for i in range(vlen):
                    name_off, value = struct.unpack_from("<Ii", self._data, pos + 12 + 8 * i)
                    self._enumerators.setdefault(self.string(name_off), int(value))
        return self._enumerators.get(member_name)

    def without(self, enumerators: frozenset[str]) -> Btf:
        """This BTF as a kernel lacking `enumerators` would show it to `enum_value` (probe.py's test
        seam); shares the index, leaves this object as it is."""
        view = copy.copy(self)
        view._absent = self._absent | enumerators
        return view

    def enum_value(self, enum_name: str, member_name: str) -> int | None:
        """The value of an enumerator of a named enum, or None when absent."""
        type_id = self.find(KIND_ENUM, enum_name)
        if type_id is None or member_name in self._absent:
            return None
        pos, _name, _kind, vlen, _kflag = self._record(type_id)
        for i in range(vlen):
            name_off, value = struct.unpack_from("<Ii", self._data, pos + 12 + 8 * i)
            if self.string(name_off) == member_name:
                return int(value)
        return None


@functools.cache
def kernel_btf(path: Path = VMLINUX_BTF) -> Btf:
    """The running kernel's BTF, parsed once per process."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KernelUnsupported(
            f"kernel has no BTF ({path}: {exc.strerror}); a kernel built with CONFIG_DEBUG_INFO_BTF is needed"
        ) from exc
    btf = Btf(data)
    log.debug("parsed kernel BTF path=%s types=%d", path, len(btf._offsets) - 1)
    return btf
