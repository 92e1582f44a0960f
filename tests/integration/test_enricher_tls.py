"""Optional TLS on both receivers (a throw-away self-signed certificate made with openssl), with a bearer
token on top: the OpenTelemetry SDK's gRPC exporter and an HTTPS client get through; plain text does not.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

from otel_kzt.agent.config import OtlpConfig
from otel_kzt.agent.encode import RequestEncoder
from otel_kzt.agent.export import Exporter
from otel_kzt.enricher.service import EnricherService
from tests.conftest import require
from tests.integration.test_enricher_badinput import good_request
from tests.integration.test_enricher_otlp import send_with_sdk
from tests.integration.test_enricher_service import (
    POD_IPS,
    api_pki,
    enricher_kubeconfig,
    running,
    served_config,
)
from tests.support.tls import Issuer, SecretVolume, der, served_certificate

__all__ = ["api_pki", "enricher_kubeconfig"]


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
    enricher_kubeconfig: Path, certificate: tuple[Path, Path], tmp_path: Path
) -> Iterator[EnricherService]:
    token = tmp_path / "token"
    token.write_text("tls-token")
    cert, key = certificate
    with running(
        served_config(
            enricher_kubeconfig, tls_cert_file=str(cert), tls_key_file=str(key), bearer_token_file=str(token)
        )
    ) as svc:
        yield svc


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


@pytest.mark.integration
def test_rotated_certificate_and_token_are_used_without_restart(
    enricher_kubeconfig: Path, tmp_path: Path
) -> None:
    """A cert-manager renewal (new key, same issuer) and a token rotation, delivered the way kubelet updates
    a Secret volume: new connections get the new certificate on both receivers, the new token is required."""
    issuer, volume = Issuer(tmp_path / "ca"), SecretVolume(tmp_path / "secret")
    first, second = issuer.issue(), issuer.issue()
    volume.write({"tls.crt": first[0], "tls.key": first[1], "token": b"old-token\n"})
    svc = EnricherService(
        served_config(
            enricher_kubeconfig,
            tls_cert_file=volume.path("tls.crt"),
            tls_key_file=volume.path("tls.key"),
            bearer_token_file=volume.path("token"),
        )
    )
    try:
        svc.start()
        ports = (svc.ports["http"], "http/1.1"), (svc.ports["grpc"], "h2")
        assert all(served_certificate(p, issuer.cert, alpn) == der(first[0]) for p, alpn in ports)
        volume.write({"tls.crt": second[0], "tls.key": second[1], "token": b"new-token\n"})
        threading.Event().wait(1.1)  # files are re-checked at most once a second
        assert all(served_certificate(p, issuer.cert, alpn) == der(second[0]) for p, alpn in ports)
        context = ssl.create_default_context(cafile=str(issuer.cert))
        body = good_request().SerializeToString()
        for token, want in (("old-token", 401), ("new-token", 200)):
            conn = http.client.HTTPSConnection("127.0.0.1", svc.ports["http"], context=context, timeout=10)
            headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {token}"}
            conn.request("POST", "/v1/metrics", body=body, headers=headers)
            assert conn.getresponse().status == want
            conn.close()
        with grpc.secure_channel(
            f"localhost:{svc.ports['grpc']}", grpc.ssl_channel_credentials(issuer.cert.read_bytes())
        ) as channel:
            call = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
            call(body, timeout=10, metadata=(("authorization", "Bearer new-token"),))
    finally:
        svc.shutdown()


@pytest.mark.integration
def test_agent_follows_a_rotated_ca_and_token(enricher_kubeconfig: Path, tmp_path: Path) -> None:
    """The issuer itself is replaced (a new CA) and the token rotated: the agent's exporter re-reads its CA
    bundle and token files and reconnects; an agent that kept the old ones would be refused or distrust
    the receiver."""
    old_ca, new_ca = Issuer(tmp_path / "ca1"), Issuer(tmp_path / "ca2")
    server, client = SecretVolume(tmp_path / "server"), SecretVolume(tmp_path / "client")
    leaf = old_ca.issue()
    server.write({"tls.crt": leaf[0], "tls.key": leaf[1], "token": b"t1"})
    client.write({"ca.crt": old_ca.cert.read_bytes(), "token": b"t1"})
    config = served_config(
        enricher_kubeconfig,
        tls_cert_file=server.path("tls.crt"),
        tls_key_file=server.path("tls.key"),
        bearer_token_file=server.path("token"),
    )
    with running(config) as svc:
        otlp = OtlpConfig(
            endpoints=(f"https://localhost:{svc.ports['grpc']}",),
            certificate=client.path("ca.crt"),
            bearer_token_file=client.path("token"),
        )
        exporter = Exporter(otlp, "node-a", resolver=lambda _h, _p: ["127.0.0.1"], max_backoff_s=0.2)
        body = next(RequestEncoder({"service.name": "t"}, "s", "1").encode([], [], 123))
        try:
            assert exporter.export([body], time.monotonic() + 5, threading.Event()).sent == 1
            leaf = new_ca.issue()
            server.write({"tls.crt": leaf[0], "tls.key": leaf[1], "token": b"t2"})
            client.write({"ca.crt": new_ca.cert.read_bytes(), "token": b"t2"})
            threading.Event().wait(1.1)  # files are re-checked at most once a second
            assert exporter.export([body], time.monotonic() + 5, threading.Event()).sent == 1
        finally:
            exporter.close()


@pytest.mark.integration
def test_failed_handshakes_keep_no_connection_place(
    enricher_kubeconfig: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    config = served_config(
        enricher_kubeconfig,
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        max_connections=3,
        header_timeout_s=1.0,
    )
    with running(config) as svc:
        for _ in range(6):  # plain text to the TLS port: the handshake fails, twice the cap
            with socket.create_connection(("127.0.0.1", svc.ports["http"]), timeout=10) as plain:
                plain.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                while plain.recv(4096):
                    pass
        context = ssl.create_default_context(cafile=str(cert))
        statuses = []
        for _ in range(20):  # their places come back once the handshake deadline (1 s) passed
            conn = http.client.HTTPSConnection("127.0.0.1", svc.ports["http"], context=context, timeout=10)
            try:
                headers = {"Content-Type": "application/x-protobuf"}
                conn.request("POST", "/v1/metrics", body=good_request().SerializeToString(), headers=headers)
                statuses.append(conn.getresponse().status)
            finally:
                conn.close()
            if statuses[-1] == 200:
                break
            threading.Event().wait(0.25)
        assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses


ROTATION = [b"t1\n", b"t1\nt2\n", b"t2\nt1\n", b"t2\n"]  # deploy/README.md's token rotation, step by step


@pytest.mark.integration
@pytest.mark.parametrize("first", ["agent", "enricher"])
def test_the_documented_token_rotation_is_never_refused(
    enricher_kubeconfig: Path, tmp_path: Path, first: str
) -> None:
    """deploy/README.md's token rotation, each step reaching one pod's Secret volume before the other's
    (kubelet updates them independently): every export between is accepted. The receiver accepts every
    line, the agent sends the first, so the new token goes second before it goes first."""
    server, client = SecretVolume(tmp_path / "server"), SecretVolume(tmp_path / "client")
    server.write({"token": ROTATION[0]})
    client.write({"token": ROTATION[0]})
    with running(served_config(enricher_kubeconfig, bearer_token_file=server.path("token"))) as svc:
        otlp = OtlpConfig(
            endpoints=(f"http://127.0.0.1:{svc.ports['grpc']}",), bearer_token_file=client.path("token")
        )
        exporter = Exporter(otlp, "node-a", max_backoff_s=0.2)
        body = next(RequestEncoder({"service.name": "t"}, "s", "1").encode([], [], 123))
        order = (client, server) if first == "agent" else (server, client)
        try:
            assert exporter.export([body], time.monotonic() + 5, threading.Event()).sent == 1
            for step in ROTATION[1:]:
                for volume in order:
                    volume.write({"token": step})
                    threading.Event().wait(1.1)  # files are re-checked at most once a second
                    result = exporter.export([body], time.monotonic() + 5, threading.Event())
                    assert result.sent == 1, (step, "agent" if volume is client else "enricher", "updated")
        finally:
            exporter.close()
