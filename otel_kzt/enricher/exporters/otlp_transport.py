"""How one consumer of an exporter sends a serialised request: OTLP/gRPC or OTLP/HTTP (protobuf).

Every failure leaves a transport as an ExportError from `otel_kzt.otlp_failures.classify`, whatever the
downstream answered (a bad status line, a truncated body, garbage, a reset): `http.client` raises a zoo of
exceptions for those, all translated here. The HTTP transport keeps its connection alive between sends and
opens a new one after any failure.
"""

from __future__ import annotations

import http.client
import ssl
from typing import Final, Protocol
from urllib.parse import urlsplit

import grpc

from otel_kzt.enricher.config import ExporterConfig
from otel_kzt.otlp_failures import classify, parse_retry_after, rpc_error_parts

METRICS: Final = "metrics"
LOGS: Final = "logs"
_GRPC_METHODS: Final = {
    METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    LOGS: "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
_MAX_ERROR_BODY: Final = 64 * 1024


class Transport(Protocol):
    def send(self, signal: str, payload: bytes) -> None:
        """Deliver one serialised request; raise an ExportError from `classify`."""

    def close(self) -> None: ...


class GrpcTransport:
    def __init__(self, cfg: ExporterConfig) -> None:
        url = urlsplit(cfg.endpoint if "://" in cfg.endpoint else f"http://{cfg.endpoint}")
        target = url.netloc or url.path
        options = [("grpc.max_send_message_length", -1)]
        if url.scheme == "https" or (not cfg.insecure and url.scheme != "http"):
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
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
    """One keep-alive connection, reopened after any failure."""

    def __init__(self, cfg: ExporterConfig) -> None:
        url = urlsplit(cfg.endpoint.rstrip("/"))
        self._secure = url.scheme == "https"
        self._host, self._port = url.hostname or "localhost", url.port
        self._paths = {s: f"{url.path}/v1/{s}" for s in (METRICS, LOGS)}
        self._headers = {"Content-Type": "application/x-protobuf", **dict(cfg.headers)}
        self._timeout = cfg.timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._secure:
                context = ssl.create_default_context()
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=context
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def send(self, signal: str, payload: bytes) -> None:
        try:
            conn = self._connection()
            conn.request("POST", self._paths[signal], body=payload, headers=self._headers)
            response = conn.getresponse()
            body = response.read(_MAX_ERROR_BODY)
            if response.length:  # more than we care to read: do not reuse the connection
                self.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # refused, reset, timed out, a bad status line, a truncated or garbled answer
            self.close()
            raise classify(None, f"{type(exc).__name__}: {exc}") from exc
        if response.will_close:
            self.close()
        if response.status // 100 != 2:
            retry_after = parse_retry_after(response.getheader("Retry-After"))
            raise classify(response.status, body[:200].decode(errors="replace"), retry_after)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
