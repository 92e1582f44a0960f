"""Transports, retry classification, receiver choice and failover, against real gRPC and HTTP servers."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from otel_kzt.agent.config import GRPC, HTTP_PROTOBUF, OtlpConfig
from otel_kzt.agent.encode import RequestEncoder
from otel_kzt.agent.export import Exporter, expand, rendezvous_rank
from otel_kzt.agent.transport import GrpcTransport, HttpTransport, Target
from otel_kzt.errors import NoAnswer, NotSent, PermanentExportError, RetryableExportError
from otel_kzt.otlp_failures import classify
from tests.unit.test_agent_service import receiver
from tests.unit.test_agent_support import Failure, GrpcReceiver, HttpReceiver

__all__ = ["receiver"]  # the fixture, re-used

BODY = next(RequestEncoder({"service.name": "t"}, "s", "1").encode([], [], 123))


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver()
    try:
        yield r
    finally:
        r.close()


def exporter(endpoints: str, protocol: str = GRPC, **kw: object) -> Exporter:
    cfg = OtlpConfig(
        endpoints=tuple(endpoints.split(",")),
        protocol=protocol,
        timeout_s=2.0,
        headers=(("x-tenant", "t1"),),
        **kw,
    )  # type: ignore[arg-type]
    return Exporter(cfg, "node-a", max_backoff_s=0.2)


def deliver(exp: Exporter, deadline_s: float = 5.0) -> tuple[int, int, float]:
    started = time.monotonic()
    try:
        result = exp.export([BODY], time.monotonic() + deadline_s, threading.Event())
    finally:
        exp.close()
    return result.sent, result.failed, time.monotonic() - started


@pytest.mark.parametrize(
    ("status", "retry", "retryable"),
    [
        (grpc.StatusCode.UNAVAILABLE, None, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, True),
        (grpc.StatusCode.ABORTED, None, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 1.5, True),
        (grpc.StatusCode.INVALID_ARGUMENT, None, False),
        (grpc.StatusCode.UNAUTHENTICATED, None, False),
        (429, 2.0, True),
        (502, None, True),
        (503, None, True),
        (504, None, True),
        (400, None, False),
        (401, None, False),
        (413, None, False),
        (500, None, False),
    ],
)
def test_classification(status: grpc.StatusCode | int, retry: float | None, retryable: bool) -> None:
    error = classify(status, "m", retry)
    assert isinstance(error, RetryableExportError if retryable else PermanentExportError)
    if retryable:
        assert error.retry_after_s == retry  # type: ignore[attr-defined]


def test_grpc_delivers_bytes_headers_and_gzip(receiver: GrpcReceiver) -> None:
    exp = exporter(f"http://127.0.0.1:{receiver.port}", compression="gzip")
    assert deliver(exp)[:2] == (1, 0)
    [got] = receiver.snapshot()
    assert got == ExportMetricsServiceRequest.FromString(BODY)
    assert receiver.metadata[0]["x-tenant"] == "t1"


def test_grpc_retries_retryable_codes_honouring_retry_info(receiver: GrpcReceiver) -> None:
    receiver.fail_next(Failure(grpc.StatusCode.UNAVAILABLE), Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.6))
    sent, failed, took = deliver(exporter(f"http://127.0.0.1:{receiver.port}"))
    assert (sent, failed, receiver.calls) == (1, 0, 3)
    assert took >= 0.6  # the server's RetryInfo delay was waited for
    assert len(receiver.snapshot()) == 1


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_grpc_permanent_is_dropped_without_retry(receiver: GrpcReceiver, code: grpc.StatusCode) -> None:
    receiver.fail_next(Failure(code))
    assert deliver(exporter(f"http://127.0.0.1:{receiver.port}"))[:2] == (0, 1)
    assert receiver.calls == 1


def test_partial_success_is_not_retried(receiver: GrpcReceiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.reject_points = 3
    exp = exporter(f"http://127.0.0.1:{receiver.port}")
    result = exp.export([BODY], time.monotonic() + 5, threading.Event())
    exp.close()
    assert (result.sent, result.rejected_points, receiver.calls) == (1, 3, 1)
    assert "partial success" in caplog.text


def test_retries_end_at_the_deadline(receiver: GrpcReceiver) -> None:
    receiver.fail_next(*[Failure(grpc.StatusCode.UNAVAILABLE)] * 1000)
    sent, failed, took = deliver(exporter(f"http://127.0.0.1:{receiver.port}"), deadline_s=1.0)
    assert (sent, failed) == (0, 1)
    assert took < 1.5 and receiver.calls >= 3


def test_http_transport(http_receiver: HttpReceiver) -> None:
    ok = ExportMetricsServiceResponse()
    ok.partial_success.rejected_data_points = 2
    http_receiver.behaviour.responses.extend(
        [
            (503, {"Retry-After": "0.4"}, b"busy"),
            (429, {}, status_pb2.Status(message="later").SerializeToString()),
            (200, {}, ok.SerializeToString()),
        ]
    )
    exp = exporter(http_receiver.url, HTTP_PROTOBUF, compression="gzip")
    started = time.monotonic()
    result = exp.export([BODY], time.monotonic() + 5, threading.Event())
    assert time.monotonic() - started >= 0.4
    assert (result.sent, result.failed, result.rejected_points) == (1, 0, 2)
    headers, body = http_receiver.behaviour.bodies[-1]
    assert headers["content-type"] == "application/x-protobuf" and headers["x-tenant"] == "t1"
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == BODY
    assert len(http_receiver.behaviour.bodies) == 3


def test_http_permanent(http_receiver: HttpReceiver) -> None:
    http_receiver.behaviour.responses.append((400, {}, b"bad"))
    assert deliver(exporter(http_receiver.url, HTTP_PROTOBUF))[:2] == (0, 1)
    assert len(http_receiver.behaviour.bodies) == 1


def test_rendezvous_is_stable_and_moves_little() -> None:
    targets = [Target(f"http://10.0.0.{i}:4317", f"10.0.0.{i}", False) for i in range(5)]
    nodes = [f"node-{i}" for i in range(200)]
    first = {n: rendezvous_rank(n, targets)[0] for n in nodes}
    assert first == {n: rendezvous_rank(n, list(reversed(targets)))[0] for n in nodes}
    assert len(set(first.values())) == 5  # spread over every receiver
    fewer = targets[:4]
    moved = [n for n in nodes if rendezvous_rank(n, fewer)[0] != first[n]]
    assert all(first[n] == targets[4] for n in moved)  # only agents of the removed receiver move


def test_name_resolving_to_several_addresses_expands() -> None:
    def resolver(host: str, port: int) -> list[str]:
        return ["10.1.0.1", "10.1.0.2", "fd00::3"] if host == "enricher.svc" else [host]

    got = expand(["http://enricher.svc:4317", "https://one:4317"], True, resolver)
    assert [t.url for t in got] == [
        "http://10.1.0.1:4317",
        "http://10.1.0.2:4317",
        "http://[fd00::3]:4317",
        "https://one:4317",
    ]
    assert got[0].server_name == "enricher.svc" and not got[0].secure and got[3].secure


def test_retry_after_as_seconds_or_http_date() -> None:
    from email.utils import formatdate

    from otel_kzt.otlp_failures import parse_retry_after as _retry_after

    assert _retry_after("2.5") == 2.5
    assert _retry_after(None) is None and _retry_after("soon") is None
    in_a_minute = _retry_after(formatdate(time.time() + 60, usegmt=True))
    assert in_a_minute is not None and 55 < in_a_minute <= 60


def test_stop_ends_retries_at_once(receiver: GrpcReceiver) -> None:
    receiver.fail_next(*[Failure(grpc.StatusCode.UNAVAILABLE, 5.0)] * 10)
    exp = exporter(f"http://127.0.0.1:{receiver.port}")
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    result = exp.export([BODY], time.monotonic() + 30, stop)
    exp.close()
    assert (result.sent, result.failed) == (0, 1)
    assert time.monotonic() - started < 2.0  # not the 5 s the server asked for


def test_http_answers_that_are_not_http_are_retried_until_one_is() -> None:
    """The agent's HTTP transport turns whatever a broken receiver or middlebox answers into a retryable
    failure, never an exception out of the export loop (the enricher's exporter has the same test)."""
    from tests.unit.test_enricher_exporter import BROKEN_ANSWERS, _Scripted

    server = _Scripted(list(BROKEN_ANSWERS))
    try:
        sent, failed, _ = deliver(exporter(f"http://127.0.0.1:{server.port}", HTTP_PROTOBUF), deadline_s=20.0)
    finally:
        server.close()
    assert (sent, failed) == (1, 0) and server.bodies == len(BROKEN_ANSWERS) + 1  # each retried, then 200


@pytest.mark.parametrize("protocol", [GRPC, HTTP_PROTOBUF])
def test_a_request_that_never_left_is_not_sent_one_answered_late_may_have_been_counted(
    receiver: GrpcReceiver, protocol: str
) -> None:
    """`NotSent` (nothing listens: connection refused) is the one failure after which the receiver cannot
    hold the request; a deadline that passes while the receiver works on it is not (DESIGN §5.7: the
    agent's next receiver begins from what this one was sent)."""
    closed = GrpcReceiver().start()
    port = closed.port
    closed.stop()
    target = Target(f"http://127.0.0.1:{port}", "127.0.0.1", False)
    with pytest.raises(NotSent):
        _transport(target, protocol).send(BODY, 2.0)
    if protocol == GRPC:
        receiver.on_export = lambda _request: time.sleep(1.0)  # recorded, then answered too late
        late = Target(f"http://127.0.0.1:{receiver.port}", "127.0.0.1", False)
        with pytest.raises(RetryableExportError) as raised:
            _transport(late, protocol).send(BODY, 0.3)
        assert isinstance(raised.value, NoAnswer) and len(receiver.snapshot()) == 1


def _transport(target: Target, protocol: str) -> GrpcTransport | HttpTransport:
    if protocol == GRPC:
        return GrpcTransport(target, (), "none", None, reconnect_max_s=1.0)
    return HttpTransport(target, (), "none", None)
