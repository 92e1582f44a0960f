"""glibc's malloc told to keep freed large buffers for reuse, for the enricher.

The enricher handles buffers of a megabyte and more per request (the enriched request, the exporter's
batch, grpcio's copy of it). glibc serves them from a thread's arena and, once the arena's free top grows
past its trim threshold (by default twice the largest buffer freed so far), gives the pages back with
madvise; the next buffer faults every page in again and the kernel zeroes it. In the default
configuration's bench (bench/enricher.py) that was ~1,950 page faults per interval in the exporter's
consumers and ~1,450 in the receiver's workers, about a third of the consumers' CPU. A fixed mmap
threshold (glibc's own upper bound for it) and a trim threshold of 64 MiB keep the freed pages in the
arena: peak memory is what it was (the same buffers are live at once), it is only not given back between
intervals. Process-wide, as a service's start may set it; nothing is done where malloc is not glibc's or
where the operator set malloc's tunables (GLIBC_TUNABLES, MALLOC_*_ environment variables).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Final

log = logging.getLogger(__name__)

MMAP_THRESHOLD: Final = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD: Final = 64 * 1024 * 1024
_M_TRIM_THRESHOLD: Final = -1  # <malloc.h>
_M_MMAP_THRESHOLD: Final = -3


def _operator_set() -> bool:
    env = os.environ
    return "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in env
    )


def keep_freed_buffers() -> bool:
    """Set the thresholds; True when they were set (glibc, no tunables of the operator's)."""
    if _operator_set():
        return False
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or getattr(libc, "gnu_get_libc_version", None) is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:
        log.warning("malloc thresholds not set: mallopt refused")
    return done
