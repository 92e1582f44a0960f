"""The caches' caps on /metrics (DESIGN §5.6): how often each one was emptied on reaching its cap.

Read at scrape time from each `Cap`'s count (processing/bounded.py), so an insert touches no metric. Every
cache is exported from the start, at 0, so alerts and dashboards can use increase(). An emptied cache
loses nothing but time: its entries are made again from their keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from otel_kzt import schema
from otel_kzt.enricher.processing.bounded import Cap


class CacheResets(Collector):
    """`kzt_enricher_cache_resets_total{cache}`, one series per `Cap`."""

    def __init__(self, caps: Iterable[Cap]) -> None:
        self._caps = tuple(caps)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            schema.ENRICHER_CACHE_RESETS,
            "Times a cache of the enricher was emptied on reaching its cap (its entries are made again)",
            labels=[schema.ENRICHER_CACHE_LABEL],
        )
        for cap in self._caps:
            family.add_metric([cap.name], float(cap.resets))
        yield family
