"""Optional TLS on both receivers (a throw-away self-signed certificate made with openssl), with a bearer
token on top: the OpenTelemetry SDK's gRPC exporter and an HTTPS client get through; plain text does not.
"""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

from otel_kzt.enricher.service import EnricherService
from tests.conftest import require
from tests.integration.test_enricher_badinput import good_request
from tests.integration.test_enricher_otlp import send_with_sdk
from tests.integration.test_enricher_service import POD_IPS, local_config, metadata_file, wait_ready

__all__ = ["metadata_file"]


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    require(shutil.which("openssl") is not None, "openssl is not installed (scripts/setup.sh)")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_service(
    metadata_file: Path, certificate: tuple[Path, Path], tmp_path: Path
) -> Iterator[EnricherService]:
    token = tmp_path / "token"
    token.write_text("tls-token")
    cert, key = certificate
    svc = EnricherService(
        local_config(
            metadata_file, tls_cert_file=str(cert), tls_key_file=str(key), bearer_token_file=str(token)
        )
    )
    try:
        svc.start()
        wait_ready(svc)
        yield svc
    finally:
        svc.shutdown()


@pytest.mark.integration
def test_tls_receivers(tls_service: EnricherService, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    body = good_request().SerializeToString()
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("127.0.0.1", tls_service.ports["http"], context=context, timeout=10)
    try:
        headers = {"Content-Type": "application/x-protobuf", "Authorization": "Bearer tls-token"}
        conn.request("POST", "/v1/metrics", body=body, headers=headers)
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    plain = http.client.HTTPConnection("127.0.0.1", tls_service.ports["http"], timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        plain.request("POST", "/v1/metrics", body=body, headers={"Content-Type": "application/x-protobuf"})
        plain.getresponse()
    plain.close()

    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    exporter = OTLPMetricExporter(
        endpoint=f"127.0.0.1:{tls_service.ports['grpc']}",
        credentials=credentials,
        headers={"authorization": "Bearer tls-token"},
    )
    send_with_sdk(exporter, [(POD_IPS["web-1"], POD_IPS["cache-1"], 42)])
    assert tls_service.core is not None and tls_service.core.active_series >= 2
