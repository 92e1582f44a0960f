"""The one "emptied when full" rule of the enricher's caches (DESIGN §5.6: every cache has a cap, reaching
it is counted and logged).

Every entry of these caches is made again from its key (encoded pieces, sorted key orders, answers of an
index), so emptying one loses nothing but time, and a cache without an eviction order keeps its lookups at
plain-dict speed: the caches stay plain dicts and sets, and only their inserts pass through a `Cap`.
"""

from __future__ import annotations

import logging
from typing import Protocol

from otel_kzt.tally import Tally

log = logging.getLogger(__name__)


class _Cache(Protocol):
    def __len__(self) -> int: ...

    def clear(self) -> None: ...


class Cap:
    """How many entries one cache holds; `resets` counts the times it was emptied on reaching them."""

    __slots__ = ("_resets", "limit", "name")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._resets = Tally()  # the caches are shared by the receivers' threads

    @property
    def resets(self) -> int:
        return self._resets.value

    def room(self, cache: _Cache) -> None:
        """Make room for one more entry: empty the cache when it holds `limit` (call before inserting).
        The check is all an insert pays; only emptying counts, under the tally's lock."""
        if len(cache) >= self.limit:
            cache.clear()
            resets = self._resets.add()
            log.info("cache emptied at its cap cache=%s cap=%d resets=%d", self.name, self.limit, resets)
