"""Have the kernel refuse one system call to the calling thread only: a seccomp filter answering an
errno, as a container's seccomp profile or the kernel itself would (membarrier(GLOBAL) under nohz_full
answers EINVAL). Other threads of the process are untouched; the filter lasts until the thread ends, so
run it in a thread of its own."""

from __future__ import annotations

import ctypes
import os
import struct

from otel_kzt.errors import KernelUnsupported

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse_in_this_thread(syscall_nr: int, err: int) -> None:
    """From now on `syscall_nr` fails with `err` in the calling thread (and what it starts)."""
    arch = AUDIT_ARCH.get(os.uname().machine)
    if arch is None:
        raise KernelUnsupported(f"no seccomp audit arch known for {os.uname().machine}")
    # (code, jt, jf, k): seccomp_data.arch at 4, .nr at 0; another arch or call is allowed
    program = [
        (LD_W_ABS, 0, 0, 4),
        (JEQ_K, 0, 3, arch),
        (LD_W_ABS, 0, 0, 0),
        (JEQ_K, 0, 1, syscall_nr),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | err),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    raw = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *ins) for ins in program))
    prog = _Prog(len(program), ctypes.addressof(raw))
    libc = ctypes.CDLL(None, use_errno=True)
    if (
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0
    ):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
