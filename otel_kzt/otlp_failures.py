"""What an OTLP send failure means: the one permanent-vs-retryable decision for agent and enricher.

The OTLP specification lists the retryable gRPC codes and HTTP statuses; `RESOURCE_EXHAUSTED` is retryable
only when the server sent `RetryInfo` (otherwise it means "too large", which retrying cannot fix). A
transport failure with no status (refused, reset, timed out) is retryable. A receiver whose TLS
certificate fails verification is permanent (`ReceiverTrustError`): a wrong certificate does not fix
itself. gRPC reports that as `UNAVAILABLE` with the TLS library's reason in the message, hence the text
check. Every OTLP client in the package raises what `classify` returns, so the rule lives here once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import parsedate_to_datetime
from typing import Final

import grpc
from google.rpc import error_details_pb2, status_pb2

from otel_kzt.errors import ExportError, PermanentExportError, ReceiverTrustError, RetryableExportError

RETRYABLE_GRPC: Final = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
RETRYABLE_HTTP: Final = frozenset({429, 502, 503, 504})
# What gRPC's TLS stack (BoringSSL, its hostname check) and Python's ssl write when verification fails; a
# handshake that fails for another reason (a reset, a receiver restarting) stays retryable.
_TLS_VERIFY_FAILED: Final = ("CERTIFICATE_VERIFY_FAILED", "Hostname Verification Check failed")


def classify(
    status: grpc.StatusCode | int | None, message: str, retry_after_s: float | None = None
) -> ExportError:
    """A gRPC status, an HTTP status, or None (no answer at all) -> the ExportError to raise."""
    if any(reason in message for reason in _TLS_VERIFY_FAILED):
        return ReceiverTrustError(f"TLS certificate verification failed: {message}")
    if status is None:
        return RetryableExportError(f"transport: {message}", retry_after_s)
    if isinstance(status, grpc.StatusCode):
        retryable = status in RETRYABLE_GRPC or (
            status is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s is not None
        )
        text = f"gRPC {status.name}: {message}"
    else:
        retryable = status in RETRYABLE_HTTP
        text = f"HTTP {status}: {message}"
    if retryable:
        return RetryableExportError(text, retry_after_s)
    return PermanentExportError(text)


def grpc_retry_delay(trailers: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The server's RetryInfo delay from the `grpc-status-details-bin` trailer, if any."""
    for key, value in trailers or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def rpc_error_parts(error: grpc.RpcError) -> tuple[grpc.StatusCode | None, str, float | None]:
    """(status, details, RetryInfo delay) of a gRPC failure; a non-Call error has no status."""
    if not isinstance(error, grpc.Call):
        return None, str(error), None
    return error.code(), error.details() or "", grpc_retry_delay(error.trailing_metadata())


def parse_retry_after(value: str | None) -> float | None:
    """HTTP `Retry-After`: delay seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass  # not seconds: an HTTP date
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
