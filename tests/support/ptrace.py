"""Hold one thread of another process inside a chosen system call, with ptrace, while its other threads run.

`held_in_syscall(tid, number)` seizes the thread (PTRACE_SEIZE: no signal, only that thread stops),
steps it from system call to system call (PTRACE_SYSCALL) until it enters or leaves `number`, and keeps
it there until the `with` ends (PTRACE_DETACH resumes it). For an agent that is exactly a datapath read
that does not return: its interval loop thread stuck in `bpf(2)`, inside a ctypes call (so without
Python's GIL), while its HTTP thread keeps answering. Linux only; the caller must be allowed to trace
(root). All ptrace requests come from the calling thread, as the kernel requires of a tracer.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_O_TRACESYSGOOD = 1
WALL = 0x40000000
SYSCALL_STOP = signal.SIGTRAP | 0x80

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> None:
    if _libc.ptrace(request, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data)) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")


def _wait(tid: int) -> int:
    _pid, status = os.waitpid(tid, WALL)
    if not os.WIFSTOPPED(status):
        raise AssertionError(f"thread {tid} ended while traced (status {status:#x})")
    return status


def current_syscall(pid: int, tid: int) -> int | None:
    """The system call a stopped thread is in, from /proc (None: not in one)."""
    first = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0]
    return int(first) if first.lstrip("-").isdigit() and int(first) >= 0 else None


@contextmanager
def held_in_syscall(pid: int, tid: int, number: int, timeout_s: float = 30.0) -> Iterator[None]:
    _ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD)
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        _wait(tid)
        deadline = time.monotonic() + timeout_s
        pending = 0  # a signal that arrived meanwhile, handed on at the next resume
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"thread {tid} made no system call {number} within {timeout_s:.0f}s")
            _ptrace(PTRACE_SYSCALL, tid, 0, pending)
            status = _wait(tid)
            stop = os.WSTOPSIG(status)
            pending = 0
            if stop == SYSCALL_STOP:
                if current_syscall(pid, tid) == number:
                    break
            elif status >> 16 == 0 and stop != signal.SIGTRAP:
                pending = stop  # signal-delivery-stop: deliver it on
        yield
    finally:
        _ptrace(PTRACE_DETACH, tid, 0, 0)
