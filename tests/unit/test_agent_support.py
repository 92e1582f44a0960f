"""Test receivers for the agent's tests: a real OTLP gRPC server and a real HTTP server, in-process.

Both record what they got (decoded with opentelemetry-proto) and can be told to fail the next calls with
chosen codes, so retry behaviour is tested against the real wire. Also a fake flow map and metadata index.
"""

from __future__ import annotations

import http.server
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from otel_kzt.agent.flows import FlowCounters, FlowKey, Snapshot
from otel_kzt.k8s.model import Endpoint, NodeInfo


@dataclass
class Failure:
    code: grpc.StatusCode
    retry_delay_s: float | None = None


def _retry_trailer(code: grpc.StatusCode, delay: float) -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(delay), nanos=int((delay % 1) * 1e9))
    )
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message="slow down")
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


class _Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, owner: GrpcReceiver) -> None:
        self.owner = owner

    def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        owner = self.owner
        with owner.lock:
            owner.calls += 1
            owner.metadata.append(dict(context.invocation_metadata()))
            failure = owner.failures.popleft() if owner.failures else None
            if failure is None:
                owner.requests.append(request)
            hook = owner.on_export
        if hook is not None and failure is None:
            hook(request)  # before the response: the sender is still waiting for it
        if failure is not None:
            if failure.retry_delay_s is not None:
                context.set_trailing_metadata(_retry_trailer(failure.code, failure.retry_delay_s))
            context.abort(failure.code, f"told to fail with {failure.code.name}")
        response = metrics_service_pb2.ExportMetricsServiceResponse()
        if owner.reject_points:
            response.partial_success.rejected_data_points = owner.reject_points
            response.partial_success.error_message = "some were bad"
        return response


class GrpcReceiver:
    """An OTLP/gRPC metrics receiver on `address` (port 0: any free port); `stop()`/`start()` again."""

    def __init__(self, address: str = "127.0.0.1:0") -> None:
        self.lock = threading.Lock()
        self.requests: list[ExportMetricsServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.failures: deque[Failure] = deque()
        self.reject_points = 0
        self.calls = 0
        # Called with each accepted request before it is answered (a test acting while the agent waits).
        self.on_export: Callable[[ExportMetricsServiceRequest], None] | None = None
        self._address = address
        self._server: grpc.Server | None = None
        self.port = 0

    def start(self) -> GrpcReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Servicer(self), server)
        host = self._address.rsplit(":", 1)[0]
        self.port = server.add_insecure_port(f"{host}:{self.port or self._address.rsplit(':', 1)[1]}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def fail_next(self, *failures: Failure) -> None:
        with self.lock:
            self.failures.extend(failures)

    def snapshot(self) -> list[ExportMetricsServiceRequest]:
        with self.lock:
            return list(self.requests)


def points(requests: Iterable[ExportMetricsServiceRequest], metric: str) -> list[dict[str, object]]:
    """Every data point of `metric` as a dict of its attributes plus `_value`, `_start`, `_time`."""
    out: list[dict[str, object]] = []
    for request in requests:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != metric:
                        continue
                    data = m.sum.data_points if m.HasField("sum") else m.gauge.data_points
                    for p in data:
                        attrs: dict[str, object] = {
                            kv.key: getattr(kv.value, kv.value.WhichOneof("value") or "string_value")
                            for kv in p.attributes
                        }
                        attrs["_value"] = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        attrs["_start"] = p.start_time_unix_nano
                        attrs["_time"] = p.time_unix_nano
                        out.append(attrs)
    return out


@dataclass
class HttpBehaviour:
    responses: deque[tuple[int, dict[str, str], bytes]] = field(default_factory=deque)
    bodies: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


class HttpReceiver:
    """http.server answering POSTs with queued (status, headers, body), else 200 + empty response."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.behaviour = HttpBehaviour()
        behaviour = self.behaviour

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                behaviour.bodies.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status, headers, payload = (
                    behaviour.responses.popleft()
                    if behaviour.responses
                    else (200, {}, ExportMetricsServiceResponse().SerializeToString())
                )
                self.send_response(status)
                for k, v in {"Content-Type": "application/x-protobuf", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the tests assert on what was received."""

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class FakeMap:
    """A flow map in memory like the datapath: `snapshot()` reads, `evict()` removes keys and hands their
    final counters (plus any `race` packets, which arrive after the last read) to the next snapshot."""

    def __init__(self, capacity: int = 65536) -> None:
        self.flows: dict[FlowKey, FlowCounters] = {}
        self.capacity = capacity
        self.now_ns = 1_700_000_000 * 10**9
        self.evicted: list[FlowKey] = []
        self.finals: dict[FlowKey, FlowCounters] = {}  # for the next snapshot's `evicted`
        self.race: dict[FlowKey, tuple[int, int]] = {}  # (bytes, packets) added at eviction
        self.overflow = (0, 0)

    def add(self, key: FlowKey, nbytes: int, packets: int = 1) -> None:
        old = self.flows.get(key)
        if old is None:
            self.flows[key] = FlowCounters(nbytes, packets, self.now_ns, self.now_ns)
        else:
            self.flows[key] = FlowCounters(
                old.bytes + nbytes, old.packets + packets, old.first_seen_unix_ns, self.now_ns
            )

    def snapshot(self) -> Snapshot:
        finals, self.finals = self.finals, {}
        return Snapshot(
            dict(self.flows), self.overflow[0], self.overflow[1], self.capacity, self.now_ns, evicted=finals
        )

    def evict(self, keys: Iterable[FlowKey]) -> int:
        count = 0
        for key in keys:
            counters = self.flows.pop(key, None)
            if counters is None:
                continue
            extra_bytes, extra_packets = self.race.pop(key, (0, 0))
            self.finals[key] = FlowCounters(
                counters.bytes + extra_bytes,
                counters.packets + extra_packets,
                counters.first_seen_unix_ns,
                counters.last_seen_unix_ns,
            )
            self.evicted.append(key)
            count += 1
        return count


class FakeIndex:
    """A MetadataIndex over fixed dicts; bump `generation` after changing them."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.generation = 1
        self.is_ready = True

    def ready(self) -> bool:
        return self.is_ready

    def lookup(self, address: str, at_unix_s: float | None = None) -> Endpoint | None:
        return self.endpoints.get(address) if self.is_ready else None

    def node(self, name: str) -> NodeInfo | None:
        return self.nodes.get(name)
