"""bench/enricher_cluster.py's senders account for every point: a request answered OK, retried, or given
up is counted, so the cluster figure cannot print a short downstream count with nothing said (a sender
that raised once lost its share of an interval silently, its thread's traceback on a discarded stderr)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from bench.enricher_cluster import EXPORT, main, points_in, send_all
from bench.payloads import build_payloads


class Scripted(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers the export method's calls in turn from a script of statuses (OK once the script is out)."""

    def __init__(self, script: list[grpc.StatusCode | int]) -> None:
        self.script, self.lock = list(script), threading.Lock()
        self.handler = grpc.unary_unary_rpc_method_handler(self.answer)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handler if details.method == EXPORT else None

    def answer(self, _raw: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            step = self.script.pop(0) if self.script else grpc.StatusCode.OK
        if isinstance(step, grpc.StatusCode) and step is not grpc.StatusCode.OK:
            context.abort(step, "scripted")
        response = ExportMetricsServiceResponse()
        if isinstance(step, int):  # OK, these points rejected (partial success)
            response.partial_success.rejected_data_points = step
        return bytes(response.SerializeToString())


@pytest.fixture
def server() -> Iterator[tuple[Scripted, int]]:
    handler = Scripted([])
    srv = grpc.server(ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield handler, port
    finally:
        srv.stop(0).wait()


def payloads(agents: int) -> list[bytes]:
    ips = [[f"10.0.{a}.{p + 1}" for p in range(2)] for a in range(agents)]
    return build_payloads(ips, 3, 1)[0]


def test_transient_failures_are_retried_and_permanent_ones_counted_as_given_up(
    server: tuple[Scripted, int],
) -> None:
    handler, port = server
    handler.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT, 2]
    row = payloads(3)
    (sent,) = send_all(port, [row], 1)
    each = points_in(row[0])
    assert (sent.requests, sent.ok, sent.retried, sent.failed) == (4, 2, 1, 1)
    assert (sent.points_ok, sent.points_rejected, sent.points_failed) == (2 * each - 2, 2, each)
    assert sent.errors["INVALID_ARGUMENT: scripted"] == 1


def test_a_request_failing_every_attempt_is_given_up_not_dropped(server: tuple[Scripted, int]) -> None:
    handler, port = server
    handler.script = [grpc.StatusCode.UNAVAILABLE] * 3
    row = payloads(2)
    (sent,) = send_all(port, [row], 1, attempts=3)
    assert (sent.ok, sent.failed, sent.points_failed) == (1, 1, points_in(row[0]))


def test_a_sender_that_cannot_send_gives_up_its_whole_share_counted() -> None:
    row = payloads(4)
    sent = send_all(0, [row], 2, attempts=1)  # port 0: every call fails to connect (UNAVAILABLE)
    assert [one.failed for one in sent] == [2, 2]
    assert sum(one.points_failed for one in sent) == sum(map(points_in, row))
    assert not any(one.ok for one in sent)


def test_the_bench_fails_when_a_point_is_not_accounted_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() exits 1, saying so, when a sender gave up points (here: nothing listens)."""
    import bench.enricher_cluster as cluster

    def short(*_args: object) -> cluster.Result:
        result = cluster.Result(received=400, sent=cluster.send_all(0, [payloads(2)], 1, attempts=1))
        return result

    monkeypatch.setattr(cluster, "run", short)
    monkeypatch.setattr(cluster, "report", lambda *_args: None)
    monkeypatch.setattr("sys.argv", ["enricher_cluster.py"])
    assert main() == 1
