"""OTLP/HTTP receiver: a thin transport that decodes one request and hands it to the core.

POST /v1/metrics (enriched) and /v1/logs (passed through); protobuf or JSON, gzip. Status codes follow the
OTLP specification: 200 (+ partial success), 400 undecodable, 401 bad token, 404 unknown path, 411 no
length, 413 too large, 415 unknown content type or encoding, 503 + Retry-After when the core is busy.
Errors carry a google.rpc.Status body in the request's content type.
"""

from __future__ import annotations

import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.receivers import decode
from otel_kzt.errors import (
    InvalidRequest,
    Overloaded,
    ReceiveError,
    RequestTooLarge,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

_STATUS: Final = {InvalidRequest: 400, RequestTooLarge: 413, UnsupportedMediaType: 415, Overloaded: 503}
_GRPC_CODE: Final = {400: 3, 401: 16, 404: 5, 411: 3, 413: 8, 415: 3, 503: 14}
_DRAIN_CHUNK: Final = 1 << 16


class ReceiverSettings:
    def __init__(
        self,
        host: str,
        port: int,
        max_request_bytes: int,
        bearer_token: str | None,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.host, self.port, self.max_request_bytes = host, port, max_request_bytes
        self.bearer_token, self.tls = bearer_token, tls


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a connection may sit idle or stall mid-request before its thread gives up

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        content_type = self.headers.get_content_type()
        reply_type = decode.JSON if content_type == decode.JSON else decode.PROTOBUF
        try:
            body = self._checked_body(path, content_type)
            if path == "/v1/metrics":
                request = decode.parse(body, content_type, ExportMetricsServiceRequest)
                raw = body if content_type == decode.PROTOBUF else None
                outcome = self.server.core.consume_metrics(request, raw=raw)
                response = ExportMetricsServiceResponse()
                if outcome.rejected:
                    response.partial_success.rejected_data_points = outcome.rejected
                    response.partial_success.error_message = outcome.message
                self._send(200, decode.to_body(response, reply_type), reply_type)
            else:
                self.server.core.consume_logs(decode.parse(body, content_type, ExportLogsServiceRequest))
                self._send(200, decode.to_body(ExportLogsServiceResponse(), reply_type), reply_type)
        except _Refused as exc:
            self._error(exc.status, exc.message, reply_type)
        except Overloaded as exc:
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
            self._error(503, str(exc), reply_type, headers)
        except ReceiveError as exc:
            self._error(_STATUS.get(type(exc), 400), str(exc), reply_type)
        except Exception:  # a bug of ours: answer 500 (retryable for nobody) and keep serving
            log.exception("otlp http: internal error path=%s", path)
            self.close_connection = True
            self._error(500, "internal error", reply_type)

    def _checked_body(self, path: str, content_type: str) -> bytes:
        limit = self.server.settings.max_request_bytes
        token = self.server.settings.bearer_token
        length_text = self.headers.get("Content-Length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        if path not in ("/v1/metrics", "/v1/logs"):
            self._discard(length, limit)
            raise _Refused(404, f"unknown path {path!r} (/v1/metrics, /v1/logs)")
        if token is not None and self.headers.get("Authorization", "") != f"Bearer {token}":
            self._discard(length, limit)
            raise _Refused(401, "missing or wrong bearer token")
        if content_type not in decode.CONTENT_TYPES:
            self._discard(length, limit)
            raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}")
        if length is None:
            self.close_connection = True
            raise _Refused(411, "Content-Length required")
        if length > limit:
            self._discard(length, limit)
            raise RequestTooLarge(f"request of {length} bytes exceeds max_request_bytes={limit}")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise InvalidRequest("body shorter than Content-Length")
        return decode.decompress(body, self.headers.get("Content-Encoding", ""), limit)

    def _discard(self, length: int | None, limit: int) -> None:
        """Read an unwanted body so the client sees our answer, not a reset; close if it is huge."""
        if length is None or length > 2 * limit:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, _DRAIN_CHUNK))
            if not chunk:
                break
            length -= len(chunk)

    def _error(
        self, status: int, message: str, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        body = decode.to_body(
            status_pb2.Status(code=_GRPC_CODE.get(status, 2), message=message), content_type
        )
        self._send(status, body, content_type, headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class _Refused(Exception):
    """An HTTP-only refusal (404, 401, 411) that has no place in the shared exception tree."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: ReceiverSettings, core: Core) -> None:
        super().__init__((settings.host, settings.port), _Handler)
        self.settings, self.core = settings, core
        if settings.tls is not None:
            # Handshake on first read, in the handler thread: a slow client must not stall accept().
            self.socket = settings.tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )


class HttpReceiver:
    """Start/stop wrapper: `start()` binds and serves on a thread; `shutdown()` is idempotent."""

    def __init__(self, settings: ReceiverSettings, core: Core) -> None:
        self._settings, self._core = settings, core
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        self._server = _Server(self._settings, self._core)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="kzt-otlp-http", daemon=True
        )
        self._thread.start()
        return int(self._server.server_address[1])

    def shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
