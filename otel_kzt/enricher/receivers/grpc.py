"""OTLP/gRPC receiver: a thin transport that hands one request's bytes to the core.

Generic handlers take the raw bytes: the core reads a steady request from them alone and has any other
decoded here, so decoding errors are ours to answer (INVALID_ARGUMENT). gRPC itself
enforces the message size (RESOURCE_EXHAUSTED, no RetryInfo: too large stays too large) and speaks gzip
and deflate. Bounded and retryable beyond: more than `max_concurrent_calls` calls at once, or a message
that does not fit the shared in-flight byte budget, is answered RESOURCE_EXHAUSTED with a RetryInfo delay
(OTLP clients retry that); the first check happens before the message is read. A busy core answers
UNAVAILABLE with RetryInfo. The certificate is re-read when its files change (dynamic credentials).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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

from otel_kzt import schema
from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.receivers.caps import Errors, ReceiverMetrics
from otel_kzt.enricher.receivers.settings import ReceiverSettings
from otel_kzt.errors import Overloaded
from otel_kzt.tally import Tally

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
Behaviour = Callable[[bytes, grpc.ServicerContext], bytes]

METRICS_METHOD: Final = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
LOGS_METHOD: Final = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
_RETRY_AFTER_S: Final = 1


class _Admission(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Admits at most `limit` calls at once; the others are refused before their message is read.

    Both handlers are stream-unary on our side (the wire is the same for a unary client): gRPC then always
    runs them, even for a call cancelled while it waited for a worker, so an admitted call's slot is always
    given back; and the refusal aborts without reading the request at all.
    """

    def __init__(self, methods: dict[str, Behaviour], limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._limit = limit
        self._refused = Tally()
        self.errors = Errors(log)
        self._handlers = {
            method: grpc.stream_unary_rpc_method_handler(self._admitted(method, behaviour))
            for method, behaviour in methods.items()
        }
        self._refuse = grpc.stream_unary_rpc_method_handler(self._refusal)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(details.method)
        if handler is None:
            return None
        if not self._slots.acquire(blocking=False):
            self._refused.add()
            return self._refuse
        return handler

    @property
    def refused(self) -> int:
        return self._refused.value

    def _admitted(
        self, method: str, behaviour: Behaviour
    ) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
        def run(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            try:
                raw = next(requests, None)  # the one message of a unary call
                if raw is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
                    raise AssertionError("abort raises")
                return behaviour(raw, context)
            except grpc.RpcError:
                raise  # the call itself ended (a client that cancelled while it waited): nothing of ours
            except Exception as exc:
                if context.code() is not None:  # our own answer: abort() set it, then raised
                    raise
                self.errors.add(exc, method)  # else grpcio would answer UNKNOWN: not retried, lost
                _abort_retry_later(context, grpc.StatusCode.UNAVAILABLE, "internal error, retry later")
            finally:
                self._slots.release()

        return run

    def _refusal(self, _requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        _abort_retry_later(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"receiver busy: {self._limit} calls in flight (max_concurrent_calls)",
        )


class GrpcReceiver:
    def __init__(self, settings: ReceiverSettings, core: Core) -> None:
        self._settings, self._core = settings, core
        self._server: grpc.Server | None = None
        self.admission = _Admission(
            {METRICS_METHOD: self._metrics, LOGS_METHOD: self._logs}, settings.max_concurrent_calls
        )

    def report(self, caps: ReceiverMetrics) -> None:
        admission = self.admission
        caps.refused["grpc", schema.ENRICHER_REFUSED_CONCURRENT_CALLS] = lambda: admission.refused
        caps.errors["grpc"] = admission.errors

    def start(self) -> int:
        settings = self._settings
        server = grpc.server(
            ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="kzt-otlp-grpc"),
            options=[
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((self.admission,))
        address = f"{settings.host}:{settings.port}"
        if settings.tls is not None:
            port = server.add_secure_port(address, settings.tls.grpc_credentials())
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
        if not self._settings.auth.required:
            return
        metadata = dict(context.invocation_metadata())
        authorization = metadata.get("authorization")
        if not self._settings.auth.accepts(authorization if isinstance(authorization, str) else None):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def _admit(self, context: grpc.ServicerContext) -> None:
        try:
            self._settings.downstream.check()
        except Overloaded as exc:
            _abort_retry_later(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    def _metrics(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        self._authorize(context)
        self._admit(context)
        with self._settings.budget.hold() as hold:
            _charge(hold.take, len(raw), context)
            try:  # a steady request is read from its bytes alone; the core decodes any other
                outcome = self._core.consume_encoded(
                    raw, lambda body: _decode(body, ExportMetricsServiceRequest, context)
                )
            except Overloaded as exc:
                _abort_retry_later(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        response = ExportMetricsServiceResponse()
        if outcome.rejected:
            response.partial_success.rejected_data_points = outcome.rejected
            response.partial_success.error_message = outcome.message
        return bytes(response.SerializeToString())

    def _logs(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        self._authorize(context)
        self._admit(context)
        with self._settings.budget.hold() as hold:
            _charge(hold.take, len(raw), context)
            self._core.consume_logs(_decode(raw, ExportLogsServiceRequest, context))
        return bytes(ExportLogsServiceResponse().SerializeToString())


def _charge(take: Callable[[int], None], size: int, context: grpc.ServicerContext) -> None:
    try:
        take(size)
    except Overloaded as exc:
        _abort_retry_later(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


def _decode(raw: bytes, message_type: type[M], context: grpc.ServicerContext) -> M:
    try:
        return message_type.FromString(raw)  # type: ignore[no-any-return]
    except (DecodeError, RuntimeError, ValueError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable protobuf: {exc}")
        raise AssertionError("abort raises") from exc


def _abort_retry_later(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Abort with a RetryInfo delay in `grpc-status-details-bin`: OTLP clients retry after it."""
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=_RETRY_AFTER_S))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(code, message)
    raise AssertionError("abort raises")
