"""OTLP transports that send pre-serialized `ExportMetricsServiceRequest` bytes: gRPC and http/protobuf.

Both are thin: they send, read the response's partial success, and translate every failure into
`otel_kzt.errors` at this boundary through `otel_kzt.otlp_failures.classify`, the one place (shared with
the enricher's exporters) that decides which failures are retried.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from otel_kzt import __version__
from otel_kzt.errors import NoAnswer, NotSent, ReceiverTrustError, RetryableExportError
from otel_kzt.otlp_failures import classify, parse_retry_after, rpc_error_parts

log = logging.getLogger(__name__)

EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
USER_AGENT = f"otel-kzt-agent/{__version__}"
# gRPC's answer when the channel has no connection to pick for the call (every address refused, none
# reachable): the call is failed before anything is written.
_GRPC_NO_CONNECTION = "failed to connect to all addresses"


@dataclass(frozen=True, slots=True)
class Target:
    """One concrete receiver: where to connect, and the name to verify TLS against."""

    url: str  # as configured or with the host replaced by a resolved address
    server_name: str  # the configured host name (TLS verification, HTTP Host)
    secure: bool


class Transport(Protocol):
    def send(self, body: bytes, timeout_s: float) -> int:
        """Send one request; returns rejected data points (partial success). Raises ExportError."""
        ...

    def close(self) -> None: ...


def _partial_success(response: ExportMetricsServiceResponse, where: str) -> int:
    partial = response.partial_success
    if partial.rejected_data_points or partial.error_message:
        # Not retried: the receiver has decided about these points, sending them again would not help.
        log.warning(
            "partial success: endpoint=%s rejected_data_points=%d message=%r",
            where,
            partial.rejected_data_points,
            partial.error_message,
        )
    return int(partial.rejected_data_points)


class GrpcTransport:
    def __init__(
        self,
        target: Target,
        headers: tuple[tuple[str, str], ...],
        compression: str,
        ca_pem: bytes | None,
        reconnect_max_s: float,
    ) -> None:
        parsed = urllib.parse.urlsplit(target.url if "://" in target.url else f"//{target.url}")
        address = f"{parsed.hostname}:{parsed.port or 4317}"
        if ":" in (parsed.hostname or ""):
            address = f"[{parsed.hostname}]:{parsed.port or 4317}"
        # A receiver that comes back must be found soon: grpc's default reconnect backoff grows to 120 s.
        options: list[tuple[str, str | int]] = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", max(200, int(reconnect_max_s * 1000))),
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if target.secure:
            if target.server_name != parsed.hostname:
                options.append(("grpc.ssl_target_name_override", target.server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._where = target.url
        self._metadata = headers
        self._compression = grpc.Compression.Gzip if compression == "gzip" else grpc.Compression.NoCompression
        self._call = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=lambda body: body,  # already serialized on the wire (encode.py)
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )

    def send(self, body: bytes, timeout_s: float) -> int:
        try:
            response = self._call(
                body, timeout=timeout_s, metadata=self._metadata, compression=self._compression
            )
        except grpc.RpcError as exc:
            status, details, retry_after = rpc_error_parts(exc)
            error = classify(status, details, retry_after)  # a certificate refused first: not retried
            if type(error) is RetryableExportError and status == grpc.StatusCode.DEADLINE_EXCEEDED:
                error = NoAnswer(str(error), retry_after)  # the receiver may be counting it still
            elif type(error) is RetryableExportError and details.startswith(_GRPC_NO_CONNECTION):
                error = NotSent(str(error), retry_after)
            raise error from exc
        return _partial_success(response, self._where)

    def close(self) -> None:
        self._channel.close()


class _HTTPSConnection(http.client.HTTPSConnection):
    """Connects to a resolved address but verifies the certificate against the configured name."""

    def __init__(
        self, host: str, port: int | None, server_name: str, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._tls = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


class HttpTransport:
    def __init__(
        self,
        target: Target,
        headers: tuple[tuple[str, str], ...],
        compression: str,
        ca_pem: bytes | None,
    ) -> None:
        self._url = urllib.parse.urlsplit(target.url)
        self._target = target
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": USER_AGENT,
            "Host": self._url.netloc.replace(self._url.hostname or "", target.server_name, 1),
            **dict(headers),
        }
        self._gzip = compression == "gzip"
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._context: ssl.SSLContext | None = None
        if target.secure:
            self._context = ssl.create_default_context(cadata=ca_pem.decode() if ca_pem else None)

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        host, port = self._url.hostname or "", self._url.port
        if self._context is None:
            return http.client.HTTPConnection(host, port, timeout=timeout_s)
        name = self._target.server_name
        return _HTTPSConnection(host, port, name, timeout=timeout_s, context=self._context)

    def send(self, body: bytes, timeout_s: float) -> int:
        payload = gzip.compress(body, compresslevel=1) if self._gzip else body
        connection = self._connection(timeout_s)
        try:
            self._connect(connection)
            connection.request("POST", self._url.path or "/v1/metrics", payload, self._headers)
            response = connection.getresponse()
            data = response.read()
        except ssl.SSLCertVerificationError as exc:
            raise ReceiverTrustError(
                f"{self._target.url}: TLS certificate verification failed: {exc}"
            ) from exc
        except TimeoutError as exc:  # sent (the connection was made), no answer in time
            raise NoAnswer(f"{self._target.url}: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            # Refused, reset, timed out, TLS failure mid-stream: the receiver may be back next time.
            raise RetryableExportError(f"{self._target.url}: {exc}") from exc
        finally:
            connection.close()
        if response.status // 100 != 2:
            retry_after = parse_retry_after(response.getheader("Retry-After"))
            raise classify(response.status, _http_message(data), retry_after)
        try:
            return _partial_success(ExportMetricsServiceResponse.FromString(data), self._target.url)
        except Exception as exc:  # protobuf raises DecodeError; a 2xx with a foreign body is still accepted
            log.warning("unreadable OTLP response body: endpoint=%s error=%s", self._target.url, exc)
            return 0

    def _connect(self, connection: http.client.HTTPConnection) -> None:
        """The connection (and TLS handshake) before anything is sent: a failure here is `NotSent`."""
        try:
            connection.connect()
        except ssl.SSLCertVerificationError:
            raise  # the receiver's certificate: send() says so
        except OSError as exc:
            connection.close()
            raise NotSent(f"{self._target.url}: {exc}") from exc

    def close(self) -> None:
        """Nothing held between requests (one connection per send)."""


def _http_message(data: bytes) -> str:
    try:
        return status_pb2.Status.FromString(data).message or data[:200].decode(errors="replace")
    except Exception:  # a plain-text or HTML error page, not a google.rpc.Status
        return data[:200].decode(errors="replace")
