"""TLS to the receiver: the configured CA is used, and a name resolved to addresses is still verified by name.

The certificate (made with the openssl CLI) names only `localhost`, so connecting to a resolved address
works only if the transport verifies against the configured host name (gRPC name override, HTTPS SNI).
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from otel_kzt.agent.config import GRPC, HTTP_PROTOBUF, OtlpConfig
from otel_kzt.agent.encode import RequestEncoder
from otel_kzt.agent.export import Exporter
from otel_kzt.agent.transport import GrpcTransport, HttpTransport, Target
from otel_kzt.errors import ReceiverTrustError, RetryableExportError
from otel_kzt.otlp_failures import classify
from tests.conftest import require
from tests.unit.test_agent_support import GrpcReceiver, _Servicer

BODY = next(RequestEncoder({"service.name": "t"}, "s", "1").encode([], [], 123))


@pytest.fixture(autouse=True)
def _needs_openssl() -> None:
    require(shutil.which("openssl") is not None, "needs the openssl CLI (scripts/setup.sh)")


SUBJECT = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]


def _self_signed(d: Path, name: str) -> tuple[Path, Path]:
    """A key and a self-signed certificate for `localhost` only, made with the openssl CLI."""
    key, crt = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *SUBJECT]
    subprocess.run([*command, "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return key, crt


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"), "ka")


@contextlib.contextmanager
def _grpc_server(cert: tuple[Path, Path]) -> Iterator[GrpcReceiver]:
    """A TLS gRPC receiver of the test certificate, on a port of its own."""
    receiver = GrpcReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Servicer(receiver), server)
    creds = grpc.ssl_server_credentials([(cert[0].read_bytes(), cert[1].read_bytes())])
    receiver.port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield receiver
    finally:
        server.stop(None).wait()


@pytest.fixture
def grpc_tls(cert: tuple[Path, Path]) -> Iterator[GrpcReceiver]:
    with _grpc_server(cert) as receiver:
        yield receiver


def _export(cfg: OtlpConfig, resolver: object = None, deadline_s: float = 3.0) -> int:
    kw = {"resolver": resolver} if resolver else {}
    exporter = Exporter(cfg, "node-a", max_backoff_s=0.2, **kw)  # type: ignore[arg-type]
    try:
        return exporter.export([BODY], time.monotonic() + deadline_s, threading.Event()).sent
    finally:
        exporter.close()


def _two_addresses(host: str, port: int) -> list[str]:
    # 127.0.0.3 has no listener: whichever rank it gets, the agent fails over to 127.0.0.1.
    return ["127.0.0.1", "127.0.0.3"] if host == "localhost" else [host]


class _Served:
    """A TLS receiver of either protocol: its port and how many requests it accepted."""

    def __init__(self, port: int, received: Callable[[], int]) -> None:
        self.port, self._received = port, received

    @property
    def received(self) -> int:
        return self._received()


@contextlib.contextmanager
def _server(protocol: str, cert: tuple[Path, Path]) -> Iterator[_Served]:
    if protocol == GRPC:
        with _grpc_server(cert) as receiver:
            yield _Served(receiver.port, lambda: len(receiver.snapshot()))
        return
    got: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            body = ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    https = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert[1]), str(cert[0]))
    https.socket = context.wrap_socket(https.socket, server_side=True)
    thread = threading.Thread(target=https.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Served(https.server_address[1], lambda: len(got))
    finally:
        https.shutdown()
        https.server_close()
        thread.join()


def _first(cfg: OtlpConfig, node: str) -> str:
    exporter = Exporter(cfg, node)
    try:
        return exporter.ranked_targets()[0].url
    finally:
        exporter.close()


def test_grpc_tls_with_ca_and_name_verification(grpc_tls: GrpcReceiver, cert: tuple[Path, Path]) -> None:
    url = f"https://localhost:{grpc_tls.port}"
    assert _export(OtlpConfig(endpoints=(url,), protocol=GRPC, certificate=str(cert[1]), timeout_s=1)) == 1
    assert (
        _export(
            OtlpConfig(endpoints=(url,), protocol=GRPC, certificate=str(cert[1]), timeout_s=1), _two_addresses
        )
        == 1
    )
    assert len(grpc_tls.snapshot()) == 2
    # Without the CA the self-signed receiver is not trusted: nothing is sent.
    assert _export(OtlpConfig(endpoints=(url,), protocol=GRPC, timeout_s=0.5), deadline_s=1.0) == 0
    assert len(grpc_tls.snapshot()) == 2


def test_https_with_ca_and_name_verification(cert: tuple[Path, Path]) -> None:
    with _server(HTTP_PROTOBUF, cert) as server:
        url = f"https://localhost:{server.port}/v1/metrics"
        cfg = OtlpConfig(endpoints=(url,), protocol=HTTP_PROTOBUF, certificate=str(cert[1]), timeout_s=1)
        assert _export(cfg) == 1
        assert _export(cfg, _two_addresses) == 1
        assert server.received == 2
        untrusted = OtlpConfig(endpoints=(url,), protocol=HTTP_PROTOBUF, timeout_s=0.5)
        assert _export(untrusted, deadline_s=1.0) == 0
        assert server.received == 2


@pytest.mark.parametrize("server_name", ["localhost", "not-localhost"])
def test_grpc_verification_failure_is_permanent(
    grpc_tls: GrpcReceiver, cert: tuple[Path, Path], server_name: str
) -> None:
    # Untrusted (no CA given) or trusted but for another name: a wrong certificate does not fix itself.
    ca = cert[1].read_bytes() if server_name != "localhost" else None
    transport = GrpcTransport(
        Target(f"https://127.0.0.1:{grpc_tls.port}", server_name, True), (), "none", ca, 1.0
    )
    try:
        with pytest.raises(ReceiverTrustError):
            transport.send(BODY, 2.0)
    finally:
        transport.close()


@pytest.mark.parametrize("server_name", ["localhost", "not-localhost"])
def test_https_verification_failure_is_permanent(cert: tuple[Path, Path], server_name: str) -> None:
    ca = cert[1].read_bytes() if server_name != "localhost" else None
    with _server(HTTP_PROTOBUF, cert) as server:
        target = Target(f"https://127.0.0.1:{server.port}/v1/metrics", server_name, True)
        with pytest.raises(ReceiverTrustError):
            HttpTransport(target, (), "none", ca).send(BODY, 2.0)
        assert server.received == 0


@pytest.mark.parametrize("protocol", [GRPC, HTTP_PROTOBUF])
def test_untrusted_receiver_is_not_retried_and_the_next_one_is_used(
    cert: tuple[Path, Path], tmp_path: Path, protocol: str
) -> None:
    """Two receivers, the agent trusts only the first's CA: whatever the ranking, the untrusted one is
    tried at most once and the request goes to the trusted one, without waiting for the deadline."""
    other = _self_signed(tmp_path, "other")
    with _server(protocol, cert) as trusted, _server(protocol, other) as untrusted:
        path = "/v1/metrics" if protocol == HTTP_PROTOBUF else ""
        urls = (f"https://localhost:{trusted.port}{path}", f"https://localhost:{untrusted.port}{path}")
        cfg = OtlpConfig(endpoints=urls, protocol=protocol, certificate=str(cert[1]), timeout_s=2)
        node = next(n for n in (f"node-{i}" for i in range(100)) if _first(cfg, n) == urls[1])
        exporter = Exporter(cfg, node, max_backoff_s=0.2)
        started = time.monotonic()
        try:
            sent = exporter.export([BODY], time.monotonic() + 10, threading.Event()).sent
            assert exporter.current is not None and exporter.current.url == urls[0]
        finally:
            exporter.close()
        assert sent == 1 and trusted.received == 1 and untrusted.received == 0
        assert time.monotonic() - started < 3  # no retries until the 10 s deadline
        only_untrusted = replace(cfg, endpoints=urls[1:])
        started = time.monotonic()
        assert _export(only_untrusted, deadline_s=10) == 0
        assert time.monotonic() - started < 3  # given up at once: permanent


def test_classify_reads_grpc_tls_reasons() -> None:
    verify = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED: expired"
    assert isinstance(classify(grpc.StatusCode.UNAVAILABLE, verify), ReceiverTrustError)
    # A handshake cut short (a receiver restarting) is not a verdict on the certificate.
    reset = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SYSCALL: Connection reset by peer"
    assert isinstance(classify(grpc.StatusCode.UNAVAILABLE, reset), RetryableExportError)
