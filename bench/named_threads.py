"""Runs `otel-kzt` with every Python thread's name given to its OS thread, so a benchmark can read each
role's CPU from /proc (receiver workers, exporter consumers, the savings step ...). Python 3.11's threads
keep the process name ("python"); nothing else changes.

    python bench/named_threads.py enricher [flags]   # as python -m otel_kzt.cli enricher [flags]
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otel_kzt.cli import main

_PR_SET_NAME: Final = 15  # prctl(2): the calling thread's name, 15 bytes at most
_libc = ctypes.CDLL(None, use_errno=True)
_bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _named(self: threading.Thread) -> None:
    _libc.prctl(_PR_SET_NAME, self.name.encode()[:15], 0, 0, 0)
    _bootstrap(self)


threading.Thread._bootstrap_inner = _named  # type: ignore[attr-defined]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
