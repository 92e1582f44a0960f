"""OTLP/gRPC receiver: a thin transport that decodes one request and hands it to the core.

Generic handlers take the raw bytes so decoding errors are ours to answer (INVALID_ARGUMENT). gRPC itself
enforces the size limit (RESOURCE_EXHAUSTED) and handles gzip. A busy core answers UNAVAILABLE with a
RetryInfo delay, which OTLP clients honour.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.receivers.http import ReceiverSettings
from otel_kzt.errors import ConfigError, Overloaded

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

METRICS_SERVICE: Final = "opentelemetry.proto.collector.metrics.v1.MetricsService"
LOGS_SERVICE: Final = "opentelemetry.proto.collector.logs.v1.LogsService"


class GrpcReceiver:
    def __init__(
        self,
        settings: ReceiverSettings,
        core: Core,
        tls_files: tuple[str, str] | None = None,
        workers: int = 8,
    ) -> None:
        self._settings, self._core, self._tls_files, self._workers = settings, core, tls_files, workers
        self._server: grpc.Server | None = None

    def start(self) -> int:
        limit = self._settings.max_request_bytes
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="kzt-otlp-grpc"),
            # Bounded: beyond this gRPC itself answers RESOURCE_EXHAUSTED instead of queueing without end.
            maximum_concurrent_rpcs=4 * self._workers,
            options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    METRICS_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self._metrics)}
                ),
                grpc.method_handlers_generic_handler(
                    LOGS_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self._logs)}
                ),
            )
        )
        address = f"{self._settings.host}:{self._settings.port}"
        if self._tls_files is not None:
            try:
                cert, key = (Path(p).read_bytes() for p in self._tls_files)
            except OSError as exc:
                raise ConfigError("tls_cert_file", f"cannot read {exc.filename}: {exc.strerror}") from exc
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(address)
        server.start()
        self._server = server
        return int(port)

    def shutdown(self, grace_s: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait()

    def _authorize(self, context: grpc.ServicerContext) -> None:
        token = self._settings.bearer_token
        if token is None:
            return
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def _metrics(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        self._authorize(context)
        request = _decode(raw, ExportMetricsServiceRequest, context)
        try:
            outcome = self._core.consume_metrics(request, raw=raw)
        except Overloaded as exc:
            _abort_overloaded(context, exc)
        response = ExportMetricsServiceResponse()
        if outcome.rejected:
            response.partial_success.rejected_data_points = outcome.rejected
            response.partial_success.error_message = outcome.message
        return bytes(response.SerializeToString())

    def _logs(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        self._authorize(context)
        self._core.consume_logs(_decode(raw, ExportLogsServiceRequest, context))
        return bytes(ExportLogsServiceResponse().SerializeToString())


def _decode(raw: bytes, message_type: type[M], context: grpc.ServicerContext) -> M:
    try:
        return message_type.FromString(raw)  # type: ignore[no-any-return]
    except (DecodeError, RuntimeError, ValueError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable protobuf: {exc}")
        raise AssertionError("abort raises") from exc


def _abort_overloaded(context: grpc.ServicerContext, exc: Overloaded) -> NoReturn:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=max(1, round(exc.retry_after_s)))
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message=str(exc), details=[detail])
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise AssertionError("abort raises")
