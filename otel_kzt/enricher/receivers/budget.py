"""Admission: the in-flight byte budget, and the exporters' back-pressure as the receivers see it.

The budget counts request bytes held by the receivers at once, across every connection.

Why: memory must stay bounded however many clients send at once and however slowly (DESIGN §5.9). An HTTP
body is charged while it streams in (and again for its decompressed form), a gRPC message once received;
a request that does not fit is answered "retry later" (HTTP 503 + Retry-After, gRPC RESOURCE_EXHAUSTED +
RetryInfo) and what it held is returned at once. Thread-safe: the HTTP loop and gRPC workers share it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

from otel_kzt.errors import Overloaded
from otel_kzt.tally import Tally

RETRY_AFTER_S = 1.0


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0  # requests answered "retry later" for lack of budget
        self._lock = threading.Lock()

    def hold(self) -> Hold:
        """A context that owns the bytes it takes and gives them all back on exit."""
        return Hold(self)

    def _take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                self.refused += 1
                return False
            self.used += n
            return True

    def _give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Hold:
    __slots__ = ("_budget", "held")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget, self.held = budget, 0

    def take(self, n: int) -> None:
        """Charge `n` more bytes or raise Overloaded (nothing of `n` is kept then)."""
        if n <= 0:
            return
        if not self._budget._take(n):
            raise Overloaded(
                f"receiver busy: {self._budget.limit} in-flight request bytes (max_inflight_bytes) in use",
                retry_after_s=RETRY_AFTER_S,
            )
        self.held += n

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        held, self.held = self.held, 0
        self._budget._give(held)


class Downstream:
    """Refuses a request before the core counts it while an exporter's queue is full (`full()` names it).

    Agents send cumulative totals: a request answered "retry later" loses nothing, one counted and then
    dropped by a full exporter queue would be missing downstream until the next interval.
    """

    def __init__(self, full: Callable[[], str | None] = lambda: None) -> None:
        self._full = full
        self._refused = Tally()  # every receiver's threads check

    @property
    def refused(self) -> int:
        return self._refused.value

    def check(self) -> None:
        name = self._full()
        if name is not None:
            self._refused.add()
            raise Overloaded(f"exporter {name} is behind (its queue is full): retry later", RETRY_AFTER_S)
