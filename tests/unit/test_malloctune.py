"""glibc keeps the enricher's freed large buffers (malloctune): a thread's buffers of a few MiB, allocated
and freed over and over, stop faulting their pages in each time."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from otel_kzt import malloctune

# Four 2 MiB buffers live at once, then freed, 50 times, in a thread (its own arena, as the enricher's
# workers and consumers): the minor page faults of that thread.
_CHURN = """
import resource, sys, threading
from otel_kzt import malloctune
if sys.argv[1] == "keep":
    assert malloctune.keep_freed_buffers()
faults = []
def churn():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(50):
        held = [b"x" * (2 << 20) for _ in range(4)]
        del held
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=churn)
thread.start()
thread.join()
print(faults[0])
"""
_GLIBC = getattr(ctypes.CDLL(None), "gnu_get_libc_version", None) is not None


def _faults(mode: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True, env=env, timeout=60
    )
    return int(out.stdout)


@pytest.mark.skipif(not _GLIBC, reason="glibc's malloc only")
def test_freed_buffers_are_reused_without_faulting_their_pages_in_again() -> None:
    pages = 50 * 4 * (2 << 20) // 4096  # every page of every buffer
    assert _faults("default") > pages // 4  # glibc gives the freed pages back: most fault in again
    assert _faults("keep") < pages // 20  # the first round's, and little more


def test_an_operators_malloc_tunables_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert malloctune.keep_freed_buffers() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert malloctune.keep_freed_buffers() is False
