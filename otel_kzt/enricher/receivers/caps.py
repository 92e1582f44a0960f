"""The receivers' caps on /metrics: what each one refused, and the bytes and connections held now; and
the requests each failed by an error of ours.

Read at scrape time from the live counters (the budget, each HTTP port's connection gate, the gRPC
admission), so nothing is counted twice and no request path touches a metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from otel_kzt import schema
from otel_kzt.enricher.receivers.budget import ByteBudget, Downstream
from otel_kzt.ratelog import KindLog
from otel_kzt.serving.server import AsyncHttpServer
from otel_kzt.tally import Tally


class Errors:
    """Requests a receiver failed by an error of ours (a bug, never the request's fault).

    They are answered `retry later`, as the Collector's receivers answer any error that is not permanent:
    the sender keeps the data and sends it again, and the counting rule counts a value sent twice once.
    Each kind is logged with its traceback once a minute at most.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = KindLog(logger)
        self._count = Tally()  # gRPC's workers count from their own threads

    @property
    def value(self) -> int:
        return self._count.value

    def add(self, exc: BaseException, where: str) -> None:
        self._count.add()
        self._log.error(exc, "otlp: internal error, answered retry later where=%s", where)


@dataclass(eq=False)  # hashable by identity: a registry keys its collectors
class ReceiverMetrics(Collector):
    """Register once; add each receiver's readings as it starts."""

    budget: ByteBudget
    downstream: Downstream
    refused: dict[tuple[str, str], Callable[[], int]] = field(default_factory=dict)
    connections: dict[str, Callable[[], int]] = field(default_factory=dict)
    errors: dict[str, Errors] = field(default_factory=dict)

    def add_port(self, name: str, server: AsyncHttpServer) -> None:
        """An HTTP port's connection cap (the OTLP receiver's, the metrics port's): what it refused, what
        it holds."""
        self.refused[name, schema.ENRICHER_REFUSED_CONNECTIONS] = lambda: server.refused_connections
        self.connections[name] = lambda: server.connections

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            schema.ENRICHER_RECEIVER_REFUSED,
            "Requests or connections a receiver answered `retry later` because a cap was reached",
            labels=[schema.ENRICHER_RECEIVER_LABEL, schema.ENRICHER_RECEIVER_REASON_LABEL],
        )
        refused.add_metric(["all", schema.ENRICHER_REFUSED_INFLIGHT_BYTES], float(self.budget.refused))
        refused.add_metric(["all", schema.ENRICHER_REFUSED_EXPORT_QUEUE], float(self.downstream.refused))
        for (receiver, reason), read in sorted(self.refused.items()):
            refused.add_metric([receiver, reason], float(read()))
        yield refused
        yield GaugeMetricFamily(
            schema.ENRICHER_RECEIVER_INFLIGHT_BYTES,
            "Request bytes held by the receivers now (max_inflight_bytes caps it)",
            value=float(self.budget.used),
        )
        connections = GaugeMetricFamily(
            schema.ENRICHER_RECEIVER_CONNECTIONS,
            "Open connections per HTTP port (max_connections caps it)",
            labels=[schema.ENRICHER_RECEIVER_LABEL],
        )
        for receiver, read in sorted(self.connections.items()):
            connections.add_metric([receiver], float(read()))
        yield connections
        errors = CounterMetricFamily(
            schema.ENRICHER_RECEIVER_ERRORS,
            "Requests a receiver failed by an error of the enricher's own (a bug), answered `retry later`",
            labels=[schema.ENRICHER_RECEIVER_LABEL],
        )
        for receiver, count in sorted(self.errors.items()):
            errors.add_metric([receiver], float(count.value))
        yield errors
