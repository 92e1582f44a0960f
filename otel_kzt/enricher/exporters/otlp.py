"""Downstream OTLP exporters: one bounded queue and one worker thread per endpoint, gRPC or HTTP.

Payloads arrive already serialised (the core encodes a request once for every exporter). `submit_*` never
blocks: a full queue drops the payload and counts it, so a dead downstream never slows receiving or the
other exporters. Retries back off exponentially on retryable answers only (see
`otel_kzt.otlp_failures.classify`).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Final, Protocol
from urllib.parse import urlsplit

import grpc

from otel_kzt.enricher.config import PROTOCOL_HTTP, ExporterConfig
from otel_kzt.enricher.exporters.prometheus import HealthMetrics
from otel_kzt.errors import ExportError, RetryableExportError
from otel_kzt.otlp_failures import classify, parse_retry_after, rpc_error_parts

log = logging.getLogger(__name__)

METRICS: Final = "metrics"
LOGS: Final = "logs"
_GRPC_METHODS: Final = {
    METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    LOGS: "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
_BACKOFF_INITIAL_S: Final = 0.5
_BACKOFF_MAX_S: Final = 10.0


class Transport(Protocol):
    def send(self, signal: str, payload: bytes) -> None:
        """Deliver one serialised request; raise an ExportError from `classify`."""

    def close(self) -> None: ...


class GrpcTransport:
    def __init__(self, cfg: ExporterConfig) -> None:
        url = urlsplit(cfg.endpoint if "://" in cfg.endpoint else f"http://{cfg.endpoint}")
        target = url.netloc or url.path
        if url.scheme == "https" or (not cfg.insecure and url.scheme != "http"):
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self._channel = grpc.insecure_channel(target)
        self._calls = {s: self._channel.unary_unary(m) for s, m in _GRPC_METHODS.items()}
        self._metadata = tuple(cfg.headers)
        self._timeout = cfg.timeout_s

    def send(self, signal: str, payload: bytes) -> None:
        try:
            self._calls[signal](payload, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise classify(*rpc_error_parts(exc)) from exc

    def close(self) -> None:
        self._channel.close()


class HttpTransport:
    def __init__(self, cfg: ExporterConfig) -> None:
        base = cfg.endpoint.rstrip("/")
        self._urls = {s: f"{base}/v1/{s}" for s in (METRICS, LOGS)}
        self._headers = {"Content-Type": "application/x-protobuf", **dict(cfg.headers)}
        self._timeout = cfg.timeout_s

    def send(self, signal: str, payload: bytes) -> None:
        req = urllib.request.Request(self._urls[signal], data=payload, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            raise classify(exc.code, str(exc.reason), retry_after) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise classify(None, str(exc)) from exc

    def close(self) -> None:
        """Nothing pooled: urllib opens a connection per request."""


class Exporter:
    """One endpoint: bounded queue, one worker, retries, counted drops."""

    def __init__(
        self,
        cfg: ExporterConfig,
        health: HealthMetrics,
        transport: Transport | None = None,
        backoff_s: float = _BACKOFF_INITIAL_S,
    ) -> None:
        self.name = cfg.endpoint
        self._cfg = cfg
        self._health = health
        self._transport = transport or (
            HttpTransport(cfg) if cfg.protocol == PROTOCOL_HTTP else GrpcTransport(cfg)
        )
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(cfg.queue_size)
        self._closing = threading.Event()  # no new retries; drain what is queued
        self._abort = threading.Event()  # the shutdown deadline passed
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_drop_log = 0.0
        self._backoff_s = backoff_s

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kzt-export-{self.name}", daemon=True)
        self._thread.start()

    def submit_metrics(self, payload: bytes) -> None:
        self._submit(METRICS, payload)

    def submit_logs(self, payload: bytes) -> None:
        self._submit(LOGS, payload)

    def _submit(self, signal: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait((signal, payload))
        except queue.Full:
            self._drop(f"queue full (queue_size={self._cfg.queue_size})")

    def _drop(self, why: str, count: int = 1) -> None:
        self._health.export_dropped.labels(self.name).inc(count)
        now = time.monotonic()
        if now - self._last_drop_log > 10.0:
            self._last_drop_log = now
            log.warning("export dropped: exporter=%s reason=%s", self.name, why)

    def _run(self) -> None:
        while not self._abort.is_set():
            try:
                signal, payload = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            self._deliver(signal, payload)

    def _deliver(self, signal: str, payload: bytes) -> None:
        deadline = time.monotonic() + self._cfg.max_elapsed_s
        delay = self._backoff_s
        while True:
            try:
                self._transport.send(signal, payload)
                return
            except ExportError as exc:
                self._health.export_failures.labels(self.name).inc()
                wait = exc.retry_after_s if isinstance(exc, RetryableExportError) else None
                wait = delay * (0.5 + random.random()) if wait is None else wait
                if not isinstance(exc, RetryableExportError) or self._closing.is_set():
                    self._drop(f"{exc} (not retried)")
                    return
                if time.monotonic() + wait > deadline:
                    self._drop(f"{exc} (retries exhausted after {self._cfg.max_elapsed_s:.0f}s)")
                    return
                log.info(
                    "export retry: exporter=%s signal=%s delay=%.2fs error=%s", self.name, signal, wait, exc
                )
                if self._closing.wait(wait):
                    self._drop(f"{exc} (shutting down)")
                    return
                delay = min(delay * 2, _BACKOFF_MAX_S)

    def shutdown(self, timeout_s: float) -> None:
        """Stop retrying, send what is queued until `timeout_s`, count the rest as dropped. Idempotent."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._abort.set()
            self._thread.join(1.0)
        left = self._queue.qsize()
        if left:
            self._drop("shutdown deadline", left)
            while not self._queue.empty():
                self._queue.get_nowait()
        if not self._closed:
            self._closed = True
            self._transport.close()
