"""Which path the core's hot code runs: the C extension (processing/_native*.c) or the Python one.

The extension is built by the package's install and is optional there (no compiler: the install goes on),
so the enricher runs either way; `OTEL_KZT_NO_NATIVE=1` selects the Python path on purpose (tests drive
both on the same input and require the same output). Which one runs is logged once, at the first core.
Its users hand it what it needs (points.py binds the Series class): this module imports none of them.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Final

DISABLE_ENV: Final = "OTEL_KZT_NO_NATIVE"
# What its users take from it: an extension built from older sources (a worktree not rebuilt) lacks some,
# and is treated as not built rather than failing at the first use
FUNCTIONS: Final = (
    "bind", "repeat", "otlp_logs", "json_lines", "read_layout",
    "received_given", "joined", "encoded", "rendered", "ends", "slots_of", "copied", "slim",
)  # fmt: skip
_log = logging.getLogger(__name__)


def _load() -> tuple[ModuleType | None, str]:
    """(the extension, None when it is not built; what it could not import)."""
    try:
        from otel_kzt.enricher.processing import _native  # type: ignore[attr-defined]
    except ImportError as e:
        return None, str(e)
    missing = [name for name in FUNCTIONS if not hasattr(_native, name)]
    if missing:
        return None, f"{_native.__file__} is built from older sources (no {', '.join(missing)}): rebuild it"
    return _native, ""


EXTENSION, _why = _load()  # built (tests compare it with the Python loops whatever the environment says)
_disabled = os.environ.get(DISABLE_ENV, "") not in ("", "0")
MODULE: Final = None if _disabled else EXTENSION  # the one in use
BUILT: Final = EXTENSION is not None
if EXTENSION is None:
    PATH = f"Python (the C extension is not built: {_why})"
elif _disabled:
    PATH = f"Python (the C extension is disabled by {DISABLE_ENV})"
else:
    PATH = "C extension (processing/_native*.c)"
_announced = False


def announce() -> None:
    """Log once per process which path the hot loops take."""
    global _announced
    if not _announced:
        _announced = True
        _log.info("enricher hot loops: %s", PATH)
