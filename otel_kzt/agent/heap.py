"""glibc heap settings for the agent: a long-lived process whose every interval builds megabytes of
requests and throws them away (100,000 flows: ~24 requests of up to 3 MB).

glibc serves a block of 128 KiB or more with mmap and returns it on free, but after the first such free
it raises that threshold to the block's size (up to 32 MiB), so from then on the requests come from the
heap, whose freed top is kept: the agent's RSS grew by ~25 MB in its second interval at 100,000 flows
(bench/agent.py --kernel). A fixed threshold keeps big blocks mmapped and handed back at once: after
the second interval 125 MB instead of 148 MB, peak 144 MB instead of 152 MB.
Elsewhere (musl ...) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h; setting it also turns the dynamic adjustment off
# 1 MiB: the requests and the large dict tables of a snapshot are mmapped, lists of a few hundred KB
# stay on the heap (256 KiB cost ~0.2 s more CPU per interval in page faults, for 1 MB less RSS).
MMAP_THRESHOLD = 1024 * 1024


def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError) as exc:
        log.debug("%s unavailable: error=%s", name, exc)
        return None


def keep_big_blocks_mapped() -> None:
    """Big transient blocks are mmapped and returned on free, whatever was freed before (call once)."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None and not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


def release_freed() -> None:
    """Give the heap freed so far back to the OS (what start-up allocated only for a moment)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        gc.collect()
        trim(0)
