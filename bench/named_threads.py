"""Runs `otel-kzt` with every Python thread's name given to its OS thread, so a benchmark can read each
role's CPU from /proc (receiver workers, exporter consumers, the savings step ...). Python 3.11's threads
keep the process name ("python"); nothing else changes.

With KZT_BENCH_GC_FILE set, the cyclic collector's CPU time (the collecting thread's, gc.callbacks) is
kept there too, rewritten after each collection as JSON: seconds and collections per generation, so a
benchmark reads the GC share of an interval from outside.

    python bench/named_threads.py enricher [flags]   # as python -m otel_kzt.cli enricher [flags]
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otel_kzt.cli import main

_PR_SET_NAME: Final = 15  # prctl(2): the calling thread's name, 15 bytes at most
_libc = ctypes.CDLL(None, use_errno=True)
_bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _named(self: threading.Thread) -> None:
    _libc.prctl(_PR_SET_NAME, self.name.encode()[:15], 0, 0, 0)
    _bootstrap(self)


threading.Thread._bootstrap_inner = _named  # type: ignore[attr-defined]


class GcTimes:
    """Collections and their CPU seconds per generation, written to `path` after each (a collection runs
    with the GIL held: one at a time, in whichever thread allocated; the thread's CPU clock counts only
    the collection)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._started = 0.0
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
            return
        generation = int(info["generation"])
        self.seconds[generation] += time.thread_time() - self._started
        self.collections[generation] += 1
        fresh = self._path.with_suffix(".new")  # whole or not at all for a reader: renamed into place
        fresh.write_text(json.dumps({"seconds": self.seconds, "collections": self.collections}))
        os.replace(fresh, self._path)


if __name__ == "__main__":
    if os.environ.get("KZT_BENCH_GC_FILE"):
        gc.callbacks.append(GcTimes(Path(os.environ["KZT_BENCH_GC_FILE"])))
    sys.exit(main(sys.argv[1:]))
