"""kfunc.py: a kfunc call in bcc's output is a helper call to a placeholder number, rewritten before the
load into a kfunc call by BTF id. Only calls to a known placeholder change: helper calls and instructions
that merely carry the same number stay as they are."""

from __future__ import annotations

import struct

from otel_kzt.agent.datapath import kfunc
from otel_kzt.agent.datapath.btf import KIND_FUNC

CAST = kfunc.placeholder("bpf_rdonly_cast")


def test_only_calls_to_a_placeholder_become_kfunc_calls() -> None:
    code = bytearray(
        kfunc.insn(0xB7, dst=1, imm=CAST)  # r1 = <placeholder>: not a call
        + kfunc.insn(kfunc.BPF_CALL, imm=113)  # call bpf_probe_read_kernel: a helper
        + kfunc.insn(kfunc.BPF_CALL, imm=CAST)
        + kfunc.insn(kfunc.BPF_CALL, imm=CAST + 1)  # no such kfunc listed
        + kfunc.insn(0x95)
    )
    before = bytes(code)
    assert kfunc.rewrite(code, {CAST: 65406}) == 1
    insns = [struct.unpack_from("<BBhi", code, pos) for pos in range(0, len(code), 8)]
    assert insns[2] == (kfunc.BPF_CALL, kfunc.BPF_PSEUDO_KFUNC_CALL << 4, 0, 65406)
    assert code[:16] == before[:16] and code[24:] == before[24:]


def test_ids_are_those_the_kernel_has() -> None:
    class Kernel:
        def __init__(self, funcs: dict[str, int]) -> None:
            self.funcs = funcs

        def find(self, kind: int, name: str) -> int | None:
            return self.funcs.get(name) if kind == KIND_FUNC else None

    assert kfunc.ids(Kernel({"bpf_rdonly_cast": 7})) == {CAST: 7}  # type: ignore[arg-type]
    assert kfunc.ids(Kernel({})) == {}  # type: ignore[arg-type]
