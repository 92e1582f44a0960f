"""A count that several threads add to and /metrics reads, exact however the threads interleave.

`self.n += 1` is a read, an add and a write: two threads that both read 5 both write 6. CPython with
its GIL happens not to switch threads inside that statement for a plain int today; that is an accident
of where the interpreter checks for a switch, not a promise (a free-threaded build makes none). A lock
taken only to count: every tally counts a rare event (a refusal, a cache emptied), none a per-point step.
"""

from __future__ import annotations

import threading


class Tally:
    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self, n: int = 1) -> int:
        """Count `n` more; returns the count with them (for a log line every so often)."""
        with self._lock:
            self._value += n
            return self._value

    @property
    def value(self) -> int:
        return self._value  # one read of one reference: no lock needed to see a whole value
