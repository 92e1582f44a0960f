"""What both OTLP receivers share: where to listen, the size limit, who may send, TLS, the byte budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from otel_kzt.enricher.config import (
    DEFAULT_GRPC_WORKERS,
    DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
)
from otel_kzt.enricher.receivers.auth import BearerCheck, ServerTls
from otel_kzt.enricher.receivers.budget import ByteBudget, Downstream
from otel_kzt.serving.limits import HttpLimits


@dataclass(frozen=True)
class ReceiverSettings:
    host: str
    port: int
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    auth: BearerCheck = field(default_factory=BearerCheck)
    tls: ServerTls | None = None
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(DEFAULT_MAX_INFLIGHT_BYTES))
    http: HttpLimits = field(default_factory=HttpLimits)
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS  # gRPC
    downstream: Downstream = field(default_factory=Downstream)
    grpc_workers: int = DEFAULT_GRPC_WORKERS  # gRPC calls served at once
