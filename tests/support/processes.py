"""Every process a test session starts is its own to reap: the session is a child subreaper.

With `PR_SET_CHILD_SUBREAPER`, a process the session started whose parent exits (a daemon, a grandchild of
a killed agent, anything started with `start_new_session`) is re-parented to the session instead of to
init. So at the end the session's descendants are exactly what it left running: `leftovers()` finds
them, `kill_and_reap()` ends them with SIGKILL, and the run fails naming them (tests/conftest.py).
Processes of other sessions on the same machine are never descendants, so they are never touched.
`CLI` is how tests and benches start otel-kzt itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

PR_SET_CHILD_SUBREAPER = 36
# otel-kzt's command line, run by this interpreter from this checkout: [*CLI, "agent", ...]
CLI: Final = (sys.executable, "-m", "otel_kzt.cli")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    cmdline: str


def become_subreaper() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _read(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # gone meanwhile
    # comm (field 2) may hold spaces and parentheses: the fields after it start past the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[1]), fields[0], cmdline.replace(b"\0", b" ").decode(errors="replace").strip())


def descendants(root: int) -> list[Proc]:
    procs = [p for p in (_read(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()) if p]
    children: dict[int, list[Proc]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def reap_zombies() -> None:
    """Collect the exit status of every child that has exited (orphans re-parented to us included)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def leftovers(root: int) -> list[Proc]:
    """Descendants still running (zombies are reaped first: they are finished, not left running)."""
    reap_zombies()
    return [p for p in descendants(root) if p.state != "Z"]


def kill_and_reap(procs: list[Proc], timeout_s: float = 10.0) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(proc.pid, signal.SIGKILL)
    pids = {p.pid for p in procs}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pids & {p.pid for p in leftovers(os.getpid())}:
        time.sleep(0.05)


STOP_BURST = (signal.SIGTERM, signal.SIGTERM, signal.SIGINT)


def signal_burst(pid: int, signums: tuple[int, ...] = STOP_BURST) -> int:
    """Send `signums` back to back (well within a millisecond); returns the nanoseconds it took."""
    started = time.monotonic_ns()
    for signum in signums:
        os.kill(pid, signum)
    return time.monotonic_ns() - started


def stop(proc: subprocess.Popen[Any], timeout_s: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL if it lingers past `timeout_s`; returns the exit code, None when killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
