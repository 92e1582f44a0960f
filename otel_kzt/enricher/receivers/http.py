"""OTLP/HTTP receiver: a thin aiohttp adapter that reads one body, decodes it and hands it to the core.

POST /v1/metrics (enriched) and /v1/logs (passed through); protobuf or JSON; gzip, zstd or deflate; any
body framing (Content-Length or chunked). Status codes follow the OTLP specification: 200 (+ partial
success), 400 undecodable, 401 bad token, 404 unknown path, 408 body too slow, 413 too large (also after
decompression), 415 unknown content type or encoding, 503 + Retry-After when the in-flight byte budget or
the core is full. Errors carry a google.rpc.Status body in the request's content type.

The body is charged to the shared byte budget as it streams in (all at once when Content-Length says how
much comes), and its decompressed form too; decoding and enrichment run on worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.web_exceptions import HTTPException
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
from otel_kzt.enricher.receivers.budget import Hold
from otel_kzt.enricher.receivers.caps import Errors, ReceiverMetrics
from otel_kzt.enricher.receivers.settings import ReceiverSettings
from otel_kzt.errors import (
    InvalidRequest,
    Overloaded,
    ReceiveError,
    RequestTooLarge,
    UnsupportedMediaType,
)
from otel_kzt.serving.server import AsyncHttpServer

log = logging.getLogger(__name__)

_STATUS: Final = {InvalidRequest: 400, RequestTooLarge: 413, UnsupportedMediaType: 415, Overloaded: 503}
_GRPC_CODE: Final = {400: 3, 401: 16, 404: 5, 408: 4, 413: 8, 415: 3, 503: 14}
_SIGNALS: Final = {"/v1/metrics": "metrics", "/v1/logs": "logs"}
_RETRY_AFTER_S: Final = 1  # after an error of ours


@dataclass(frozen=True, slots=True)
class _Arrived:
    signal: str
    body: bytes
    encoding: str
    content_type: str


class _Refused(Exception):
    """An HTTP-only refusal (401, 404, 408) that has no place in the shared exception tree."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class HttpReceiver:
    """Start/stop wrapper: `start()` binds and serves on its own thread; `shutdown()` is idempotent."""

    def __init__(self, settings: ReceiverSettings, core: Core, workers: int = 4) -> None:
        self._settings, self._core = settings, core
        self.errors = Errors(log)
        app = web.Application(client_max_size=settings.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = AsyncHttpServer(
            "otlp-http",
            app,
            host=settings.host,
            port=settings.port,
            limits=settings.http,
            tls=settings.tls,
            workers=workers,
        )

    def report(self, caps: ReceiverMetrics) -> None:
        caps.add_port("http", self.server)
        caps.errors["http"] = self.errors

    def start(self) -> int:
        return self.server.start()

    def shutdown(self) -> None:
        self.server.shutdown()

    async def _handle(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        reply_type = decode.JSON if content_type == decode.JSON else decode.PROTOBUF
        try:
            signal = self._check(request, content_type)
            with self._settings.budget.hold() as hold:
                body = await self._body(request, hold)
                arrived = _Arrived(signal, body, request.headers.get("Content-Encoding", ""), content_type)
                answer = await self.server.run_blocking(self._consume, arrived, reply_type, hold)
            return _reply(200, answer, reply_type)
        except _Refused as exc:
            return _error(exc.status, exc.message, reply_type, close=exc.status == 408)
        except Overloaded as exc:
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
            return _error(503, str(exc), reply_type, headers)
        except ReceiveError as exc:
            return _error(_STATUS.get(type(exc), 400), str(exc), reply_type)
        except (web.RequestPayloadError, ConnectionResetError) as exc:
            # Bad chunk framing, or the client went away mid-body: answered in case it still listens.
            return _error(400, f"incomplete request body: {exc}", reply_type, close=True)
        except HTTPException:
            raise
        except Exception as exc:  # a bug of ours: retryable (a 500 is not: the sender would drop the data)
            self.errors.add(exc, request.path)
            headers = {"Retry-After": str(_RETRY_AFTER_S)}
            return _error(503, "internal error, retry later", reply_type, headers, close=True)

    def _check(self, request: web.Request, content_type: str) -> str:
        """Everything decidable from the head, before a byte of the body is read."""
        signal = _SIGNALS.get(request.path)
        if signal is None:
            raise _Refused(404, f"unknown path {request.path!r} (/v1/metrics, /v1/logs)")
        if request.method != "POST":
            raise _Refused(405, f"{request.method} not allowed (POST)")
        if not self._settings.auth.accepts(request.headers.get("Authorization")):
            raise _Refused(401, "missing or wrong bearer token")
        if content_type not in decode.CONTENT_TYPES:
            raise UnsupportedMediaType(
                f"unsupported Content-Type {content_type!r} ({', '.join(decode.CONTENT_TYPES)})"
            )
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in (*decode.ENCODINGS, "", "x-gzip"):
            raise UnsupportedMediaType(
                f"unsupported Content-Encoding {encoding!r} ({', '.join(decode.ENCODINGS)})"
            )
        length, limit = request.content_length, self._settings.max_request_bytes
        if length is not None and length > limit:
            raise RequestTooLarge(f"request of {length} bytes exceeds max_request_bytes={limit}")
        self._settings.downstream.check()
        return signal

    async def _body(self, request: web.Request, hold: Hold) -> bytes:
        """The whole body, charged to the budget while it arrives; any framing (chunked or not)."""
        limit, length = self._settings.max_request_bytes, request.content_length
        if length is not None:
            hold.take(length)
        parts, size = [], 0
        try:
            async with asyncio.timeout(self._settings.http.body_timeout_s):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise RequestTooLarge(f"request body exceeds max_request_bytes={limit}")
                    if length is None:
                        hold.take(len(chunk))
                    parts.append(chunk)
        except TimeoutError as exc:
            raise _Refused(408, f"body not received within {self._settings.http.body_timeout_s:g}s") from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _consume(self, arrived: _Arrived, reply_type: str, hold: Hold) -> bytes:
        """On a worker thread: decompress (charged), decode (all or nothing), enrich."""
        body, content_type = arrived.body, arrived.content_type
        data = decode.decompress(body, arrived.encoding, self._settings.max_request_bytes)
        if data is not body:
            hold.take(len(data))
        if arrived.signal == "logs":
            self._core.consume_logs(decode.parse(data, content_type, ExportLogsServiceRequest))
            return decode.to_body(ExportLogsServiceResponse(), reply_type)
        if content_type == decode.PROTOBUF:  # a steady request is read from its bytes alone
            outcome = self._core.consume_encoded(
                data, lambda body: decode.parse(body, content_type, ExportMetricsServiceRequest)
            )
        else:
            request = decode.parse(data, content_type, ExportMetricsServiceRequest)
            outcome = self._core.consume_metrics(request)
        response = ExportMetricsServiceResponse()
        if outcome.rejected:
            response.partial_success.rejected_data_points = outcome.rejected
            response.partial_success.error_message = outcome.message
        return decode.to_body(response, reply_type)


def _error(
    status: int,
    message: str,
    content_type: str,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> web.Response:
    body = decode.to_body(status_pb2.Status(code=_GRPC_CODE.get(status, 2), message=message), content_type)
    response = _reply(status, body, content_type, headers)
    if close:
        response.force_close()
    return response


def _reply(
    status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.Response(status=status, body=body, headers=headers)
    response.content_type = content_type
    return response
