"""A failure that can come back every interval, logged once per kind, then at most once per `every_s`.

An exception nobody translated (a transport bug, an encoding bug) may repeat at every retry and every
interval: the first of each kind (its exception type) is logged with its traceback, so it can be fixed;
repeats within `every_s` are only counted, and the next line of that kind says how many were not logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class KindLog:
    def __init__(
        self, logger: logging.Logger, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}  # kind -> when its last line was written
        self._quiet: dict[str, int] = {}  # kind -> repeats since, not logged
        self._lock = threading.Lock()

    def error(self, exc: BaseException, message: str, *args: object) -> bool:
        """Logs `message` (house style, key=value) with `exc` unless its kind was logged lately."""
        kind = type(exc).__qualname__
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._every_s:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return False
            self._last[kind] = now
            quiet = self._quiet.pop(kind, 0)
        self._log.error(f"{message} kind=%s not_logged=%d", *args, kind, quiet, exc_info=exc)
        return True
