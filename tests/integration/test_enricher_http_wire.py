"""OTLP/HTTP as real clients frame it (DESIGN §5.9): chunked bodies, keep-alive, gzip / zstd / deflate, and
the receivers' caps (in-flight bytes, connections, gRPC calls), each refusal a `retry later` answer.
Every value sent must arrive downstream; what was refused must not.
"""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import zstandard
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from otel_kzt import schema
from otel_kzt.enricher.config import ExporterConfig
from otel_kzt.enricher.service import EnricherService
from tests.integration.test_enricher_badinput import METRICS_METHOD, PB, drained, flow_json, post
from tests.integration.test_enricher_service import (
    POD_IPS,
    Downstream,
    api_pki,
    downstream,
    enricher_kubeconfig,
    get,
    metrics_showing,
    running,
    served_config,
)

__all__ = ["api_pki", "downstream", "enricher_kubeconfig"]
LIMIT = 1 << 20


def request(value: int, dst: str = "cache-1") -> bytes:
    from google.protobuf import json_format

    body = flow_json([(POD_IPS["web-1"], POD_IPS[dst], str(value))])
    return bytes(json_format.ParseDict(body, ExportMetricsServiceRequest()).SerializeToString())


def values(forwarded: list[ExportMetricsServiceRequest]) -> list[int]:
    return [
        dp.as_int
        for req in forwarded
        for rm in req.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for dp in m.sum.data_points
    ]


@pytest.fixture
def wire_service(enricher_kubeconfig: Path, downstream: Downstream) -> Iterator[EnricherService]:
    exporter = ExporterConfig(f"127.0.0.1:{downstream.port}", max_elapsed_s=5.0)
    config = served_config(
        enricher_kubeconfig,
        exporters=(exporter,),
        max_request_bytes=LIMIT,
        max_inflight_bytes=5 * LIMIT // 2,
        max_connections=40,
        max_concurrent_calls=1,
        header_timeout_s=1.0,
        body_timeout_s=3.0,
    )
    with running(config) as svc:
        yield svc


def chunked(port: int, pieces: list[bytes], headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/metrics", body=iter(pieces), headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.integration
def test_chunked_keepalive_and_every_encoding_arrive(
    wire_service: EnricherService, downstream: Downstream
) -> None:
    port = wire_service.ports["http"]
    body = request(11)
    # chunked, in small pieces, with and without gzip (what the OpenTelemetry JS exporters send)
    assert chunked(port, [body[i : i + 7] for i in range(0, len(body), 7)], {"Content-Type": PB})[0] == 200
    zipped = gzip.compress(request(12))
    pieces = [zipped[:5], zipped[5:]]
    assert chunked(port, pieces, {"Content-Type": PB, "Content-Encoding": "gzip"})[0] == 200
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    encoded = {
        13: ("zstd", zstandard.ZstdCompressor().compress(request(13))),
        14: ("deflate", zlib.compress(request(14))),
        15: ("deflate", raw_deflate.compress(request(15)) + raw_deflate.flush()),
    }
    # keep-alive: one connection, several requests
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for encoding, data in encoded.values():
            conn.request("POST", "/v1/metrics", data, {"Content-Type": PB, "Content-Encoding": encoding})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Connection") != "close", encoding
            resp.read()
    finally:
        conn.close()
    # the size limit applies after decompression, a truncated stream is refused whole
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (LIMIT + 1))
    assert post(port, bomb, headers={"Content-Encoding": "zstd"})[0] == 413
    cut = zstandard.ZstdCompressor().compress(request(99))[:-3]
    assert post(port, cut, headers={"Content-Encoding": "zstd"})[0] == 400
    assert sorted(values(drained(downstream, 5))) == [11, 12, 13, 14, 15]


@pytest.mark.integration
def test_inflight_bytes_are_charged_while_bodies_stream_in(
    wire_service: EnricherService, downstream: Downstream
) -> None:
    port = wire_service.ports["http"]
    # Two stalled bodies: one announced (charged up front), one chunked (charged as it arrives).
    announced = socket.create_connection(("127.0.0.1", port))
    announced.sendall(
        f"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: {PB}\r\n"
        f"Content-Length: {LIMIT}\r\n\r\n".encode()
        + b"\0" * 1000
    )
    streamed = socket.create_connection(("127.0.0.1", port))
    piece = b"\0" * (LIMIT - 10)
    streamed.sendall(
        f"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: {PB}\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n{len(piece):x}\r\n".encode()
        + piece
        + b"\r\n"
    )
    try:
        metrics = f"http://127.0.0.1:{wire_service.ports['metrics']}/metrics"
        for _ in range(200):  # until the chunked body is charged
            text = get(metrics)[1].splitlines()
            held = [ln for ln in text if ln.startswith(schema.ENRICHER_RECEIVER_INFLIGHT_BYTES)]
            if held and float(held[0].split()[-1]) >= 2 * LIMIT - 10:
                break
            threading.Event().wait(0.05)
        status, headers, reply = post(port, b"\0" * (LIMIT // 2 + 100))  # 2 MiB held + this > 2.5 MiB
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert "max_inflight_bytes" in status_pb2.Status.FromString(reply).message
        refused = f'{schema.ENRICHER_RECEIVER_REFUSED}_total{{reason="max_inflight_bytes",receiver="all"}}'
        metrics_showing(metrics, f"{refused} 1.0")
    finally:
        announced.close()
        streamed.close()
    # the bytes were given back: the same request now fits
    assert post(port, request(21))[0] == 200
    assert values(drained(downstream, 1)) == [21]


@pytest.mark.integration
def test_connection_cap_answers_and_stalled_clients_time_out(wire_service: EnricherService) -> None:
    port = wire_service.ports["http"]
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        for i, sock in enumerate(stalled):  # half send a partial head, half nothing at all
            if i % 2:
                sock.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n")
        over = socket.create_connection(("127.0.0.1", port), timeout=5)
        with over:
            over.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            answer = over.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        # header_timeout (1 s) closes every stalled connection, after which normal clients are served
        for sock in stalled:
            sock.settimeout(10)
            assert sock.recv(4096) == b""
    finally:
        for sock in stalled:
            sock.close()
    # a body that stops coming: answered 408 after body_timeout (3 s), the connection not kept
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(
            f"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: {PB}\r\n"
            "Content-Length: 100\r\n\r\nab".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer
    assert post(port, request(31))[0] == 200


@pytest.mark.integration
def test_grpc_calls_beyond_the_cap_are_retryable(wire_service: EnricherService) -> None:
    assert wire_service.core is not None
    lock = wire_service.core._agg.lock  # holds the one admitted call inside the core
    with grpc.insecure_channel(f"127.0.0.1:{wire_service.ports['grpc']}") as channel:
        call = channel.unary_unary(METRICS_METHOD)
        with lock:
            calls = [call.future(request(41 + i), timeout=30) for i in range(3)]
            for _ in range(400):  # two are refused at once; the admitted one waits for the lock
                if sum(f.done() for f in calls) == 2:
                    break
                threading.Event().wait(0.05)
            refused = [f.exception() for f in calls if f.done()]
        assert len(refused) == 2 and all(isinstance(e, grpc.RpcError) for e in refused)
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)  # type: ignore[union-attr]
        assert sum(f.exception() is None for f in calls) == 1  # the admitted one went through
        details = dict(refused[0].trailing_metadata())["grpc-status-details-bin"]  # type: ignore[union-attr]
        retry = error_details_pb2.RetryInfo()
        assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
        assert retry.retry_delay.seconds >= 1
        call(request(43), timeout=10)  # the slot was given back


@pytest.mark.integration
def test_an_error_of_ours_is_answered_retry_later_counted_and_loses_nothing(
    wire_service: EnricherService, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the core (here: an exception injected the first time each request arrives) must not lose
    the request: grpcio's default answer (UNKNOWN) and a 500 are not retried by OTLP clients."""
    core = wire_service.core
    assert core is not None
    consume, failed = core.consume_encoded, []

    def failing_once(raw: bytes, decode: object) -> object:
        if raw not in failed:
            failed.append(raw)
            raise IndexError("injected")
        return consume(raw, decode)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "consume_encoded", failing_once)
    with grpc.insecure_channel(f"127.0.0.1:{wire_service.ports['grpc']}") as channel:
        call = channel.unary_unary(METRICS_METHOD)
        with pytest.raises(grpc.RpcError) as caught:
            call(request(51), timeout=10)
        error = caught.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        details = dict(error.trailing_metadata())["grpc-status-details-bin"]  # type: ignore[attr-defined]
        retry = error_details_pb2.RetryInfo()
        assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
        assert retry.retry_delay.seconds >= 1
        call(request(51), timeout=10)  # the sender's retry
    status, headers, reply = post(wire_service.ports["http"], request(52, dst="api-1"))
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert "internal error" in status_pb2.Status.FromString(reply).message
    assert post(wire_service.ports["http"], request(52, dst="api-1"))[0] == 200
    assert len(failed) == 2
    assert sorted(values(drained(downstream, 2))) == [51, 52]  # each value once, none lost
    metrics = f"http://127.0.0.1:{wire_service.ports['metrics']}/metrics"
    for receiver in ("grpc", "http"):
        metrics_showing(metrics, f'{schema.ENRICHER_RECEIVER_ERRORS}_total{{receiver="{receiver}"}} 1.0')


class _Stuck(Downstream):
    """A downstream that takes requests but answers only once released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__()

    def _metrics(self, request: ExportMetricsServiceRequest, ctx: object) -> ExportMetricsServiceResponse:
        self.release.wait(30)
        return super()._metrics(request, ctx)


@pytest.mark.integration
def test_a_slow_downstream_pushes_back_instead_of_dropping(enricher_kubeconfig: Path) -> None:
    stuck = _Stuck()
    exporter = ExporterConfig(f"127.0.0.1:{stuck.port}", queue_size=4, consumers=1, max_elapsed_s=30)
    accepted: list[int] = []
    try:
        with running(served_config(enricher_kubeconfig, exporters=(exporter,), flow_logs_otlp=False)) as svc:
            for value in range(1, 30):
                status, headers, _ = post(svc.ports["http"], request(value))
                if status == 503:
                    break
                assert status == 200
                accepted.append(value)
            assert status == 503 and int(headers["Retry-After"]) >= 1, "never pushed back"
            refused = f'{schema.ENRICHER_RECEIVER_REFUSED}_total{{reason="export_queue_full",receiver="all"}}'
            metrics_showing(f"http://127.0.0.1:{svc.ports['metrics']}/metrics", f"{refused} 1.0")
            stuck.release.set()
            forwarded = values(drained(stuck, len(accepted)))
            assert forwarded == accepted  # all of them, in order; the refused one was not counted
            labels = {schema.ENRICHER_EXPORTER_LABEL: exporter.endpoint}
            assert not svc.registry.get_sample_value(f"{schema.ENRICHER_EXPORT_DROPPED}_total", labels)
    finally:
        stuck.release.set()
        stuck.stop()
