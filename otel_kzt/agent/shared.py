"""One object per distinct value among many holders: memory for 100,000 flows.

A node's flows share a few hundred addresses, ports, start seconds and point prefixes; a flow key or a
cached point head that holds the shared object instead of its own copy saves that copy's 40-80 bytes, per
flow. Bounded: once it holds far more values than the holders can use, it starts again (holders keep
theirs; only the sharing of new ones starts afresh).
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bytes, int)


class Shared:
    def __init__(self) -> None:
        self._values: dict[bytes | int, bytes | int] = {}

    def __call__(self, value: T) -> T:
        return self._values.setdefault(value, value)  # type: ignore[return-value]

    def trim(self, holders: int) -> None:
        if len(self._values) > 4 * holders + 1024:
            self._values.clear()
