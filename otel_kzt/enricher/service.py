"""Start/stop wiring of the enricher: metadata, core, receivers, exporters, and the :9464 endpoint.

`start()` returns once every port is bound (metadata syncs in the background; /readyz says when).
`shutdown()` stops receiving first, then flushes the exporters within the shutdown deadline; it is safe
twice, before `start()`, and it undoes a half-finished start.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol, TextIO

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from otel_kzt.enricher.config import EnricherConfig, split_host_port
from otel_kzt.enricher.exporters.otlp import Exporter
from otel_kzt.enricher.exporters.prometheus import Aggregates, AggregatesCollector, HealthMetrics
from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.processing.cost import load_prices
from otel_kzt.enricher.processing.flowlogs import FlowLogWriter
from otel_kzt.enricher.processing.resolution import Resolver
from otel_kzt.enricher.receivers.grpc import GrpcReceiver
from otel_kzt.enricher.receivers.http import HttpReceiver, ReceiverSettings
from otel_kzt.enricher.state.checkpointer import Checkpointer
from otel_kzt.errors import ConfigError
from otel_kzt.k8s.model import MetadataIndex

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
        self.ports: dict[str, int] = {}
        self.core: Core | None = None

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
        tls = _tls_context(cfg)
        token = _token(cfg)
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
            max_inflight=cfg.max_inflight_requests,
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
            collector.source = checkpointer.scrape
            self._stoppers.append(("checkpoint", checkpointer))
        self._serve(core, index, tls, token)

    def _serve(self, core: Core, index: MetadataIndex, tls: ssl.SSLContext | None, token: str | None) -> None:
        """Bind /metrics, then the receivers (each one registered for shutdown as soon as it runs)."""
        cfg = self.config
        if cfg.metrics_endpoint:
            server = _MetricsServer(
                split_host_port(cfg.metrics_endpoint, "metrics_endpoint"), self.registry, index
            )
            threading.Thread(
                target=server.serve_forever, args=(0.05,), name="kzt-metrics", daemon=True
            ).start()
            self._stoppers.append(("metrics", server))
            self.ports["metrics"] = int(server.server_address[1])
        if cfg.http_endpoint:
            http = HttpReceiver(self._settings(cfg.http_endpoint, "http_endpoint", tls, token), core)
            self.ports["http"] = http.start()
            self._stoppers.append(("http", http))
        if cfg.grpc_endpoint:
            files = (cfg.tls_cert_file, cfg.tls_key_file) if cfg.tls_cert_file and cfg.tls_key_file else None
            grpc_receiver = GrpcReceiver(
                self._settings(cfg.grpc_endpoint, "grpc_endpoint", None, token), core, files
            )
            self.ports["grpc"] = grpc_receiver.start()
            self._stoppers.append(("grpc", grpc_receiver))

    def _settings(
        self, endpoint: str, field: str, tls: ssl.SSLContext | None, token: str | None
    ) -> ReceiverSettings:
        host, port = split_host_port(endpoint, field)
        return ReceiverSettings(host, port, self.config.max_request_bytes, token, tls)

    def shutdown(self) -> None:
        with self._lock:
            self._stop_all()

    def _stop_all(self) -> None:
        # Receivers first (nothing new arrives), then the final checkpoint, then exporters flush, then
        # metrics and metadata.
        order = {"grpc": 0, "http": 1, "checkpoint": 2, "exporter": 3, "metrics": 4, "metadata": 5}
        parts, self._stoppers = sorted(self._stoppers, key=lambda p: order[p[0]]), []
        for kind, part in parts:
            try:
                if kind == "exporter":
                    part.shutdown(self.config.shutdown_timeout_s)  # type: ignore[attr-defined]
                elif kind == "metrics":
                    part.shutdown()  # type: ignore[attr-defined]
                    part.server_close()  # type: ignore[attr-defined]
                else:
                    part.shutdown()  # type: ignore[attr-defined]
            except Exception:
                log.exception("shutdown of %s failed", kind)  # keep stopping the rest


def _open_metadata(cfg: EnricherConfig) -> Metadata:
    from otel_kzt.k8s import open_metadata

    return open_metadata(cfg.kube_metadata, kubeconfig=cfg.kubeconfig)


def _token(cfg: EnricherConfig) -> str | None:
    if cfg.bearer_token_file is None:
        return cfg.bearer_token
    try:
        with open(cfg.bearer_token_file) as fh:
            return fh.read().strip()
    except OSError as exc:
        raise ConfigError(
            "bearer_token_file", f"cannot read {cfg.bearer_token_file}: {exc.strerror}"
        ) from exc


def _tls_context(cfg: EnricherConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert_file or not cfg.tls_key_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls_cert_file", f"cannot load {cfg.tls_cert_file} / {cfg.tls_key_file}: {exc}"
        ) from exc
    return ctx


class _MetricsHandler(BaseHTTPRequestHandler):
    server: _MetricsServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics http: " + format, *args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(self.server.registry), content_type)
        elif path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            ready = self.server.index.ready()
            self._reply(200 if ready else 503, b"ready\n" if ready else b"metadata not synced\n")
        else:
            self._reply(404, b"not found (/metrics, /healthz, /readyz)\n")

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, index: MetadataIndex) -> None:
        super().__init__(address, _MetricsHandler)
        self.registry, self.index = registry, index
