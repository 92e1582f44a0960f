"""Downstream exporters against real local gRPC and HTTP servers: retries only on retryable answers,
RetryInfo / Retry-After honoured, drops counted, a dead downstream never blocks the caller.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from otel_kzt.enricher.config import PROTOCOL_HTTP, ExporterConfig
from otel_kzt.enricher.exporters.otlp import Exporter
from otel_kzt.enricher.exporters.prometheus import HealthMetrics
from otel_kzt.errors import PermanentExportError, RetryableExportError
from otel_kzt.otlp_failures import classify

METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"


@pytest.mark.parametrize(
    ("code", "retry_after", "retryable"),
    [
        (grpc.StatusCode.UNAVAILABLE, None, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 2.0, True),
        (grpc.StatusCode.INVALID_ARGUMENT, None, False),
        (grpc.StatusCode.UNAUTHENTICATED, None, False),
        (429, 1.0, True),
        (503, None, True),
        (400, None, False),
        (413, None, False),
        (None, None, True),  # connection refused / reset
    ],
)
def test_classify(code: grpc.StatusCode | int | None, retry_after: float | None, retryable: bool) -> None:
    error = classify(code, "x", retry_after)
    assert isinstance(error, RetryableExportError if retryable else PermanentExportError)


class Answers:
    """A gRPC metrics receiver answering from a script of status codes (None = OK)."""

    def __init__(self, script: list[tuple[grpc.StatusCode, float | None] | None]) -> None:
        self.script = list(script)
        self.received: list[bytes] = []
        self.times: list[float] = []
        self.metadata: list[dict[str, str]] = []
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(self._export)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(METRICS_SERVICE, {"Export": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        self.times.append(time.monotonic())
        self.metadata.append(dict(context.invocation_metadata()))
        answer = self.script.pop(0) if self.script else None
        if answer is not None:
            code, delay = answer
            if delay is not None:
                detail = any_pb2.Any()
                detail.Pack(
                    error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(delay * 1e9)))
                )
                status = status_pb2.Status(code=code.value[0], message="busy", details=[detail])
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            context.abort(code, "scripted")
        self.received.append(raw)
        return b""


@pytest.fixture
def make_answers() -> Iterator[Callable[[list[tuple[grpc.StatusCode, float | None] | None]], Answers]]:
    made: list[Answers] = []

    def make(script: list[tuple[grpc.StatusCode, float | None] | None]) -> Answers:
        made.append(Answers(script))
        return made[-1]

    yield make
    for answers in made:
        answers.server.stop(0).wait()


def exporter_for(endpoint: str, registry: CollectorRegistry, **kw: object) -> Exporter:
    cfg = ExporterConfig(endpoint, **kw)  # type: ignore[arg-type]
    exporter = Exporter(cfg, HealthMetrics(registry), backoff_s=0.05)
    exporter.start()
    return exporter


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def counts(registry: CollectorRegistry, endpoint: str) -> tuple[float, float]:
    labels = {"exporter": endpoint}
    failures = registry.get_sample_value("kzt_enricher_export_failures_total", labels) or 0.0
    dropped = registry.get_sample_value("kzt_enricher_export_dropped_items_total", labels) or 0.0
    return failures, dropped


def test_grpc_retries_unavailable_then_delivers_with_headers(make_answers: Callable[..., Answers]) -> None:
    answers = make_answers([(grpc.StatusCode.UNAVAILABLE, None), (grpc.StatusCode.UNAVAILABLE, None), None])
    registry = CollectorRegistry()
    endpoint = f"127.0.0.1:{answers.port}"
    exporter = exporter_for(endpoint, registry, headers=(("x-scope-orgid", "team-a"),))
    try:
        exporter.submit_metrics(b"payload")
        wait_for(lambda: answers.received == [b"payload"])
        assert counts(registry, endpoint) == (2.0, 0.0)
        assert answers.metadata[-1]["x-scope-orgid"] == "team-a"
    finally:
        exporter.shutdown(1.0)


def test_grpc_permanent_error_is_not_retried(make_answers: Callable[..., Answers]) -> None:
    answers = make_answers(
        [(grpc.StatusCode.INVALID_ARGUMENT, None), (grpc.StatusCode.RESOURCE_EXHAUSTED, None)]
    )
    registry = CollectorRegistry()
    endpoint = f"127.0.0.1:{answers.port}"
    exporter = exporter_for(endpoint, registry)
    try:
        exporter.submit_metrics(b"one")
        wait_for(lambda: counts(registry, endpoint) == (1.0, 1.0))
        exporter.submit_metrics(b"two")  # alone: queued together they would go as one batch
        wait_for(lambda: counts(registry, endpoint) == (2.0, 2.0))
        time.sleep(0.2)
        assert len(answers.times) == 2 and answers.received == []
    finally:
        exporter.shutdown(1.0)


def test_grpc_resource_exhausted_with_retry_info_waits_the_delay(
    make_answers: Callable[..., Answers],
) -> None:
    answers = make_answers([(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.4), None])
    registry = CollectorRegistry()
    exporter = exporter_for(f"127.0.0.1:{answers.port}", registry)
    try:
        exporter.submit_metrics(b"x")
        wait_for(lambda: answers.received == [b"x"])
        assert answers.times[1] - answers.times[0] >= 0.35
    finally:
        exporter.shutdown(1.0)


def test_dead_downstream_never_blocks_and_drops_are_counted() -> None:
    registry = CollectorRegistry()
    endpoint = "127.0.0.1:9"  # discard port: nothing listens
    exporter = exporter_for(endpoint, registry, queue_size=2, timeout_s=0.2, max_elapsed_s=30.0)
    try:
        t0 = time.monotonic()
        for _ in range(50):
            exporter.submit_metrics(b"x")
        assert time.monotonic() - t0 < 0.1
        wait_for(lambda: counts(registry, endpoint)[1] >= 47)
    finally:
        t0 = time.monotonic()
        exporter.shutdown(0.5)
        assert time.monotonic() - t0 < 3.0  # the deadline bounds shutdown; what is left is counted
    assert counts(registry, endpoint)[1] == 50


class _Http(BaseHTTPRequestHandler):
    script: list[int] = []
    seen: list[tuple[str, str, bytes]] = []

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.script.pop(0) if self.script else 200
        if status == 200:
            self.seen.append((self.path, self.headers["Content-Type"], body))
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_http_exporter_honours_retry_after_and_paths() -> None:
    _Http.script, _Http.seen = [503, 429], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    registry = CollectorRegistry()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    exporter = exporter_for(endpoint, registry, protocol=PROTOCOL_HTTP)
    try:
        exporter.submit_metrics(b"m")
        exporter.submit_logs(b"l")
        wait_for(lambda: len(_Http.seen) == 2)
        assert sorted(_Http.seen) == [  # two shards: no order between them
            ("/v1/logs", "application/x-protobuf", b"l"),
            ("/v1/metrics", "application/x-protobuf", b"m"),
        ]
        assert counts(registry, endpoint) == (2.0, 0.0)
    finally:
        exporter.shutdown(1.0)
        exporter.shutdown(1.0)  # idempotent
        server.shutdown()
        server.server_close()


class _Scripted:
    """A raw TCP 'HTTP server' answering each connection from a script of byte strings (then 200s)."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self, script: list[bytes]) -> None:
        self.script, self.bodies = list(script), 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")).split(
                        b":"
                    )[1]
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.bodies += 1
                conn.sendall(self.script.pop(0) if self.script else self.OK)

    def close(self) -> None:
        self.sock.close()


# What a broken receiver or a middlebox may answer instead of HTTP: each one a retryable failure (the agent's
# transport has the same test, tests/unit/test_agent_export.py).
BROKEN_ANSWERS = (
    b"HTTP/1.1 2",  # truncated head
    b"HTTX/1.1 two hundred\r\n\r\n",  # bad status line
    b"\x00\xff garbage \x13\x37" * 10,  # garbage
    b"",  # closed without an answer
    b"HTTP/1.1 503 Busy\r\nRetry-After: soon\r\nConnection: close\r\n"  # garbled details
    b"Content-Length: 3\r\n\r\n\xff\xfe\x00",
)


def test_consumers_survive_truncated_garbled_and_missing_answers() -> None:
    server = _Scripted(
        [
            *BROKEN_ANSWERS,
            # the receiver said 200: delivered, though the body is cut short (resending would duplicate)
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
        ]
    )
    registry = CollectorRegistry()
    endpoint = f"http://127.0.0.1:{server.port}"
    exporter = exporter_for(endpoint, registry, protocol=PROTOCOL_HTTP, timeout_s=2.0, consumers=1)
    try:
        exporter.submit_metrics(b"m")
        wait_for(lambda: server.bodies == 6, timeout_s=20)
        wait_for(lambda: counts(registry, endpoint) == (5.0, 0.0))  # five failures, each retried, no drop
        exporter.submit_metrics(b"again")  # the same consumer is still alive
        wait_for(lambda: server.bodies == 7)
        assert counts(registry, endpoint) == (5.0, 0.0)
    finally:
        exporter.shutdown(1.0)
        server.close()


class _Buggy:
    """A transport that raises what no transport should (an injected bug) before it works."""

    def __init__(self, failures: list[Exception], sent: list[bytes]) -> None:
        self.failures, self.sent = failures, sent

    def send(self, signal: str, payload: bytes) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(payload)

    def close(self) -> None:
        """Nothing held."""


def test_any_exception_is_counted_and_retried_as_a_transport_failure() -> None:
    registry, sent = CollectorRegistry(), []
    failures: list[Exception] = [RuntimeError("bug"), KeyError("x"), http.client.BadStatusLine("??")]
    cfg = ExporterConfig("buggy:1", consumers=1)
    exporter = Exporter(
        cfg, HealthMetrics(registry), transport=lambda _c: _Buggy(failures, sent), backoff_s=0.01
    )
    exporter.start()
    try:
        exporter.submit_metrics(b"p")
        wait_for(lambda: sent == [b"p"])
        assert counts(registry, "buggy:1") == (3.0, 0.0)
    finally:
        exporter.shutdown(1.0)


def _request(resource: str, value: int) -> bytes:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key="k8s.node.name").value.string_value = resource
    rm.scope_metrics.add().metrics.add(name="kzt.flow.bytes").sum.data_points.add(as_int=value)
    return bytes(req.SerializeToString())


def test_batches_keep_each_resource_in_order_across_consumers(make_answers: Callable[..., Answers]) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    answers = make_answers([])
    registry = CollectorRegistry()
    exporter = exporter_for(f"127.0.0.1:{answers.port}", registry, consumers=3, batch_bytes=4096)
    try:
        for value in range(40):  # one request holds three agents' resources, as a Collector batches them
            exporter.submit_metrics(b"".join(_request(f"node-{n}", value) for n in range(3)))
        seen: dict[str, list[int]] = {}
        wait_for(lambda: sum(len(v) for v in seen.values()) == 120 or bool(_collect(answers, seen)), 10)
    finally:
        exporter.shutdown(1.0)
    assert {node: values for node, values in seen.items()} == {f"node-{n}": list(range(40)) for n in range(3)}
    assert len(answers.received) < 120  # batched: several requests in one send
    assert all(len(ExportMetricsServiceRequest.FromString(r).resource_metrics) for r in answers.received)


def _collect(answers: Answers, seen: dict[str, list[int]]) -> bool:
    """Rebuild, from what the downstream received so far, each resource's sequence of values."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    seen.clear()
    for raw in list(answers.received):
        for rm in ExportMetricsServiceRequest.FromString(raw).resource_metrics:
            node = rm.resource.attributes[0].value.string_value
            seen.setdefault(node, []).append(rm.scope_metrics[0].metrics[0].sum.data_points[0].as_int)
    return False


def test_back_pressure_while_the_downstream_is_alive_drops_when_it_is_dead() -> None:
    cfg = ExporterConfig("slow:1", consumers=1, queue_size=5, max_elapsed_s=0.3)
    release, sent = threading.Event(), []

    class Slow:
        def send(self, signal: str, payload: bytes) -> None:
            release.wait(5)
            sent.append(payload)

        def close(self) -> None:
            """Nothing held."""

    exporter = Exporter(cfg, HealthMetrics(CollectorRegistry()), transport=lambda _c: Slow())
    exporter.start()
    try:
        for n in range(4):
            exporter.submit_metrics(bytes([n]))
        assert not exporter.accepting()  # 4 of 5 queued (one in flight): above the high-water mark
        release.set()
        wait_for(lambda: len(sent) >= 1 and exporter.accepting())
    finally:
        exporter.shutdown(1.0)

    dead = Exporter(
        cfg, HealthMetrics(CollectorRegistry()), transport=lambda _c: _Buggy([OSError()] * 99, [])
    )
    dead._backoff_s = 0.01
    dead.start()
    try:
        for n in range(5):
            dead.submit_metrics(bytes([n]))
        wait_for(dead.accepting)  # failing for longer than max_elapsed: accept (and drop) instead of blocking
    finally:
        dead.shutdown(0.5)


class _Recording:
    def __init__(self, sent: list[bytes]) -> None:
        self._sent = sent

    def send(self, signal: str, payload: bytes) -> None:
        self._sent.append(payload)

    def close(self) -> None:
        """Nothing held."""


def test_a_lingering_consumer_is_woken_by_a_full_batch_and_an_idle_one_by_its_first_item() -> None:
    sent: list[bytes] = []
    lingering = Exporter(
        ExporterConfig("rec:1", consumers=1, batch_bytes=3, batch_linger_s=30.0),
        HealthMetrics(CollectorRegistry()),
        transport=lambda _c: _Recording(sent),
    )
    lingering.start()
    try:
        for piece in (b"a", b"b", b"c"):  # the third fills the batch: sent at once, not after 30 s
            time.sleep(0.2)  # the consumer waits: for a first item, then for a fuller batch
            lingering.submit_metrics(piece)
        wait_for(lambda: sent == [b"abc"], 3.0)
    finally:
        lingering.shutdown(1.0)
    sent.clear()
    prompt = Exporter(
        ExporterConfig("rec:2", consumers=1, batch_linger_s=0.0),
        HealthMetrics(CollectorRegistry()),
        transport=lambda _c: _Recording(sent),
    )
    prompt.start()
    try:
        time.sleep(0.2)  # the consumer waits for a first item (it would look again only after 5 s)
        prompt.submit_metrics(b"x")
        wait_for(lambda: sent == [b"x"], 2.0)
    finally:
        prompt.shutdown(1.0)
