"""Start/stop wiring of the enricher: metadata, core, receivers, exporters, and the :9464 endpoint.

`start()` returns once every port is bound (metadata syncs in the background; /readyz says when).
`shutdown()` stops receiving first, then flushes the exporters within the shutdown deadline; it is safe
twice, before `start()`, and it undoes a half-finished start.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Protocol, TextIO

from prometheus_client import CollectorRegistry

from otel_kzt import gctune, malloctune
from otel_kzt.enricher.config import EnricherConfig
from otel_kzt.enricher.exporters.caches import CacheResets
from otel_kzt.enricher.exporters.otlp import Exporter
from otel_kzt.enricher.exporters.prometheus import (
    Aggregates,
    AggregatesCollector,
    Exposition,
    HealthMetrics,
)
from otel_kzt.enricher.exporters.savings import SAVINGS_BYTES, SAVINGS_USD, SavingsCollector, combined
from otel_kzt.enricher.exporters.webapi import pages as web_pages
from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.processing.cost import load_prices
from otel_kzt.enricher.processing.flowlogs import FlowLogWriter
from otel_kzt.enricher.processing.resolution import Resolver
from otel_kzt.enricher.receivers.auth import BearerCheck, ServerTls
from otel_kzt.enricher.receivers.budget import ByteBudget, Downstream
from otel_kzt.enricher.receivers.caps import ReceiverMetrics
from otel_kzt.enricher.receivers.grpc import GrpcReceiver
from otel_kzt.enricher.receivers.http import HttpReceiver
from otel_kzt.enricher.receivers.settings import ReceiverSettings
from otel_kzt.enricher.state.agents import AgentsHealth
from otel_kzt.enricher.state.checkpointer import Checkpointer
from otel_kzt.enricher.state.savings import SavingsTracker
from otel_kzt.k8s.model import MetadataIndex, sync_summary
from otel_kzt.serving.limits import HttpLimits, split_host_port
from otel_kzt.serving.pages import MetricsPort, Page, PageRequest, Reply

log = logging.getLogger(__name__)


class Metadata(Protocol):
    """What the enricher needs of `otel_kzt.k8s.open_metadata(...)`'s handle."""

    @property
    def index(self) -> MetadataIndex: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...


class EnricherService:
    def __init__(
        self, config: EnricherConfig, metadata: Metadata | None = None, stdout: TextIO | None = None
    ):
        self.config = config.validate()
        self._metadata = metadata
        self._stdout = stdout
        self._lock = threading.Lock()
        self._started = False
        self._stoppers: list[tuple[str, object]] = []  # started parts, in start order
        self.registry = CollectorRegistry()
        self.exposition = Exposition(self.registry)  # /metrics: rebuilt at most once a second
        self.ports: dict[str, int] = {}
        self.core: Core | None = None
        self.savings: SavingsTracker | None = None
        self._web: dict[str, Page] = {}

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                self._start()
            except BaseException:
                self._stop_all()
                raise
        log.info("enricher started ports=%s exporters=%d", self.ports, len(self.config.exporters))

    def _start(self) -> None:
        cfg = self.config
        # Everything that can fail on bad files first, before anything runs.
        prices = load_prices(cfg.prices_file, cfg.default_provider)
        tls = None
        if cfg.tls_cert_file and cfg.tls_key_file:
            tls = ServerTls(cfg.tls_cert_file, cfg.tls_key_file)
        auth = BearerCheck(cfg.bearer_token, cfg.bearer_token_file)
        metadata = self._metadata or _open_metadata(cfg)
        metadata.start()
        self._stoppers.append(("metadata", metadata))
        aggregates = Aggregates(cfg.flow_aggregation)
        collector = AggregatesCollector(aggregates)
        self.registry.register(collector)
        health = HealthMetrics(self.registry)
        exporters = [Exporter(e, health) for e in cfg.exporters]
        for exporter in exporters:
            exporter.start()
            self._stoppers.append(("exporter", exporter))
        flow_log = FlowLogWriter(self._stdout or sys.stdout) if cfg.flow_logs_stdout else None
        index = metadata.index
        agents = AgentsHealth(index)  # the agents' own health, one series per node
        self.registry.register(agents)
        self.core = core = Core(
            index,
            Resolver(index, cfg.cluster_cidrs),
            aggregates,
            health,
            prices,
            sinks=exporters,
            flow_log=flow_log,
            flow_logs_otlp=cfg.flow_logs_otlp,
            max_series=cfg.max_series,
            series_ttl_s=cfg.series_ttl_s,
            lateness_s=cfg.series_lateness_s,
            max_tombstones=cfg.max_tombstones,
            max_inflight=cfg.max_inflight_requests,
            agents=agents,
        )
        self.registry.register(CacheResets(core.caps))
        # Savings: fed from the same totals as /metrics; `/` and `/api/v1/*` show them.
        totals = lambda: combined(aggregates.snapshot_of(SAVINGS_BYTES, SAVINGS_USD))  # noqa: E731
        self.savings = savings = SavingsTracker(index, totals, cfg.savings_window_s)
        self.registry.register(SavingsCollector(savings))
        savings.start()
        self._stoppers.append(("savings", savings))
        self._web = web_pages(
            aggregates.snapshot, aggregates.flow_labels, lambda: savings.report, agents=agents.health
        )
        if cfg.state_file:
            # Restored before anything is received: the first points continue the checkpoint's series.
            checkpointer = Checkpointer(
                cfg.state_file,
                core,
                cfg.checkpoint_interval_s,
                health,
                families=frozenset(aggregates.families()),
            )
            checkpointer.load()
            checkpointer.start()
            collector.source = checkpointer.persisted  # never more than is on disk
            self._stoppers.append(("checkpoint", checkpointer))
        behind = Downstream(lambda: next((e.name for e in exporters if not e.accepting()), None))
        gctune.space_collections()  # a long-lived heap of ~10 objects per series
        malloctune.keep_freed_buffers()  # megabyte buffers per request, reused without page faults
        self._serve(core, index, tls, auth, behind)

    def _serve(
        self,
        core: Core,
        index: MetadataIndex,
        tls: ServerTls | None,
        auth: BearerCheck,
        downstream: Downstream,
    ) -> None:
        """Bind /metrics, then the receivers (each one registered for shutdown as soon as it runs)."""
        cfg = self.config
        limits = HttpLimits(cfg.max_connections, cfg.header_timeout_s, cfg.body_timeout_s)
        caps = ReceiverMetrics(ByteBudget(cfg.max_inflight_bytes), downstream)  # one budget for both
        self.registry.register(caps)
        if cfg.metrics_endpoint:
            host, port = split_host_port(cfg.metrics_endpoint, "metrics_endpoint")
            metrics = MetricsPort(host, port, self._pages(index), limits)
            caps.add_port("metrics", metrics.server)  # its connection cap is counted like the receivers'
            self.ports["metrics"] = metrics.start()
            self._stoppers.append(("metrics", metrics))
        for kind, endpoint in (("http", cfg.http_endpoint), ("grpc", cfg.grpc_endpoint)):
            if not endpoint:
                continue
            host, port = split_host_port(endpoint, f"{kind}_endpoint")
            settings = ReceiverSettings(
                host,
                port,
                max_request_bytes=cfg.max_request_bytes,
                auth=auth,
                tls=tls,
                budget=caps.budget,
                http=limits,
                max_concurrent_calls=cfg.max_concurrent_calls,
                downstream=downstream,
                grpc_workers=cfg.grpc_workers,
            )
            receiver = HttpReceiver(settings, core) if kind == "http" else GrpcReceiver(settings, core)
            receiver.report(caps)
            self.ports[kind] = receiver.start()
            self._stoppers.append((kind, receiver))

    def _pages(self, index: MetadataIndex) -> dict[str, Page]:
        """The metrics port's pages; add one here (path -> function of PageRequest returning a Reply)."""
        exposition = self.exposition

        def metrics(request: PageRequest) -> Reply:
            body, content_type = exposition.render(request.headers.get("Accept", ""))
            return Reply(200, body, content_type)

        def readyz(_request: PageRequest) -> Reply:
            ready, why = sync_summary(index)  # names the resource and the HTTP status that fail
            return Reply(200 if ready else 503, b"ready\n" if ready else f"metadata: {why}\n".encode())

        pages = {"/metrics": metrics, "/healthz": lambda _r: Reply(200, b"ok\n"), "/readyz": readyz}
        return {**pages, **self._web}

    def shutdown(self) -> None:
        with self._lock:
            self._stop_all()

    def _stop_all(self) -> None:
        # Receivers first (nothing new arrives), then the final checkpoint, then exporters flush, then
        # metrics and metadata.
        order = {"grpc": 0, "http": 1, "checkpoint": 2, "exporter": 3, "metrics": 4, "savings": 5}
        order["metadata"] = 6
        parts, self._stoppers = sorted(self._stoppers, key=lambda p: order[p[0]]), []
        for kind, part in parts:
            try:
                if kind == "exporter":
                    part.shutdown(self.config.shutdown_timeout_s)  # type: ignore[attr-defined]
                else:
                    part.shutdown()  # type: ignore[attr-defined]
            except Exception:
                log.exception("shutdown of %s failed", kind)  # keep stopping the rest


def _open_metadata(cfg: EnricherConfig) -> Metadata:
    from otel_kzt.k8s import open_metadata

    return open_metadata(cfg.kube_metadata, kubeconfig=cfg.kubeconfig)
