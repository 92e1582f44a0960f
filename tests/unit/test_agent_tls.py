"""TLS to the receiver: the configured CA is used, and a name resolved to addresses is still verified by name.

The certificate (made with the openssl CLI) names only `localhost`, so connecting to a resolved address
works only if the transport verifies against the configured host name (gRPC name override, HTTPS SNI).
"""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from otel_kzt.agent.config import GRPC, HTTP_PROTOBUF, OtlpConfig
from otel_kzt.agent.encode import RequestEncoder
from otel_kzt.agent.export import Exporter
from tests.unit.test_agent_support import GrpcReceiver, _Servicer

BODY = next(RequestEncoder({"service.name": "t"}, "s", "1").encode([], [], 123))
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return key, crt


@pytest.fixture
def grpc_tls(cert: tuple[Path, Path]) -> Iterator[GrpcReceiver]:
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

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert[1]), str(cert[0]))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://localhost:{server.server_address[1]}/v1/metrics"
        cfg = OtlpConfig(endpoints=(url,), protocol=HTTP_PROTOBUF, certificate=str(cert[1]), timeout_s=1)
        assert _export(cfg) == 1
        assert _export(cfg, _two_addresses) == 1
        assert got == [BODY, BODY]
        untrusted = OtlpConfig(endpoints=(url,), protocol=HTTP_PROTOBUF, timeout_s=0.5)
        assert _export(untrusted, deadline_s=1.0) == 0
        assert len(got) == 2
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
