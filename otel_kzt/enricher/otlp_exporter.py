"""Downstream OTLP exporters: one bounded queue and one worker thread per endpoint, gRPC or HTTP.

Payloads arrive already serialised (the core encodes a request once for every exporter). `submit_*` never
blocks: a full queue drops the payload and counts it, so a dead downstream never slows receiving or the
other exporters. Retries back off exponentially on retryable answers only (see `classify`).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import grpc
from google.rpc import error_details_pb2, status_pb2

from otel_kzt.enricher.config import PROTOCOL_HTTP, ExporterConfig
from otel_kzt.enricher.prometheus import HealthMetrics
from otel_kzt.errors import ExportError, PermanentExportError, RetryableExportError

log = logging.getLogger(__name__)

METRICS: Final = "metrics"
LOGS: Final = "logs"
_GRPC_METHODS: Final = {
    METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    LOGS: "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
_RETRYABLE_GRPC: Final = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_RETRYABLE_HTTP: Final = frozenset({429, 502, 503, 504})
_BACKOFF_INITIAL_S: Final = 0.5
_BACKOFF_MAX_S: Final = 10.0


def classify(code: grpc.StatusCode | int | None, message: str, retry_after_s: float | None) -> ExportError:
    """The one place that decides permanent vs retryable (OTLP spec, "Failures" for gRPC and HTTP).

    `code` is a gRPC status, an HTTP status, or None for a transport failure (connection refused, reset,
    timeout), which is always retryable. RESOURCE_EXHAUSTED is retryable only with a RetryInfo delay.
    """
    if code is None or code in _RETRYABLE_GRPC or code in _RETRYABLE_HTTP:
        return RetryableExportError(message, retry_after_s)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s is not None:
        return RetryableExportError(message, retry_after_s)
    return PermanentExportError(message)


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
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            trailers = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
            raise classify(code, f"gRPC {code}: {details}", _grpc_retry_delay(trailers)) from exc

    def close(self) -> None:
        self._channel.close()


def _grpc_retry_delay(trailers: object) -> float | None:
    """RetryInfo.retry_delay from the google.rpc.Status in `grpc-status-details-bin`, if any."""
    for key, value in trailers or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


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
            raise classify(exc.code, f"HTTP {exc.code}: {exc.reason}", _retry_after(exc.headers)) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise classify(None, f"HTTP transport: {exc}", None) from exc

    def close(self) -> None:
        """Nothing pooled: urllib opens a connection per request."""


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


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
