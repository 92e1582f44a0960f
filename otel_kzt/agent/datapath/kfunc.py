"""Kernel functions (kfuncs) in programs compiled by bcc 0.26, which cannot call them.

The C calls a kfunc through a function pointer set to its placeholder number (as bcc's own helpers are
declared), so clang emits an ordinary helper call, `call <placeholder>`. Before a program is loaded, each
such call is rewritten in bcc's instruction buffer into a kfunc call: source register
BPF_PSEUDO_KFUNC_CALL, the function's BTF id in vmlinux as the immediate. The length stays the same, so
bcc's line and function info stay valid. The C calls one only where its flag says the kernel takes it
(the mode's load probe, e.g. netfilter.py's).
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from otel_kzt.agent.datapath.btf import KIND_FUNC, Btf

BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_KFUNC_CALL = 2
# The kfuncs the C may call, each under a placeholder far beyond every helper number: PLACEHOLDER + index.
KFUNCS = ("bpf_rdonly_cast",)
PLACEHOLDER = 0x7FFE0000
_INSN = struct.Struct("<BBhi")


def placeholder(name: str) -> int:
    return PLACEHOLDER + KFUNCS.index(name)


def ids(btf: Btf) -> dict[int, int]:
    """Placeholder -> BTF id of each kfunc this kernel has."""
    found = {placeholder(name): btf.find(KIND_FUNC, name) for name in KFUNCS}
    return {number: type_id for number, type_id in found.items() if type_id is not None}


LDX_DW, LDX_B, MOV_K, EXIT = 0x79, 0x71, 0xB7, 0x95  # BPF opcodes of the loader's probe programs


def insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One BPF instruction (for the loader's probe programs)."""
    return _INSN.pack(op, src << 4 | dst, off, imm)


def rewrite(code: bytearray, kfuncs: dict[int, int]) -> int:
    """Turn each `call <placeholder>` of `kfuncs` (placeholder -> BTF id) into a kfunc call; returns how
    many were rewritten."""
    rewritten = 0
    for pos in range(0, len(code) - _INSN.size + 1, _INSN.size):
        op, regs, _off, imm = _INSN.unpack_from(code, pos)
        if op == BPF_CALL and regs == 0 and imm in kfuncs:
            _INSN.pack_into(code, pos, BPF_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, kfuncs[imm])
            rewritten += 1
    return rewritten


def rewrite_bcc(bpf: Any, func_name: bytes, kfuncs: dict[int, int]) -> int:
    """`rewrite` in place in a bcc module's buffer of `func_name`, before `load_func` loads it."""
    from bcc import lib

    start = lib.bpf_function_start(bpf.module, func_name)
    size = lib.bpf_function_size(bpf.module, func_name)
    if not start or not kfuncs:
        return 0
    code = bytearray(ctypes.string_at(start, size))
    rewritten = rewrite(code, kfuncs)
    if rewritten:
        ctypes.memmove(start, bytes(code), size)
    return rewritten
