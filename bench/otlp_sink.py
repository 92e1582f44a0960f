"""A downstream OTLP/gRPC receiver for benchmarks, in its own process so its CPU is not the enricher's.

Counts the data points of every metrics request and the log records of every logs request; prints its
port on the first line; for every line on its standard input the counts so far as one JSON line; when its
standard input closes, it stops receiving, prints the final counts the same way and exits.

    python bench/otlp_sink.py
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

counts = {"points": 0, "requests": 0, "log_records": 0}
lock = threading.Lock()


def metrics(raw: bytes, _context: grpc.ServicerContext) -> bytes:
    request = ExportMetricsServiceRequest.FromString(raw)
    points = sum(
        len(getattr(m, m.WhichOneof("data") or "sum").data_points)
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )
    with lock:
        counts["points"] += points
        counts["requests"] += 1
    return b""


def logs(raw: bytes, _context: grpc.ServicerContext) -> bytes:
    request = ExportLogsServiceRequest.FromString(raw)
    records = sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
    with lock:
        counts["log_records"] += records
    return b""


def main() -> int:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    for service, fn in (
        ("opentelemetry.proto.collector.metrics.v1.MetricsService", metrics),
        ("opentelemetry.proto.collector.logs.v1.LogsService", logs),
    ):
        handler = grpc.unary_unary_rpc_method_handler(fn)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    for _line in sys.stdin:  # until the benchmark closes our stdin: the counts so far, when asked
        with lock:
            print(json.dumps(counts), flush=True)
    server.stop(1).wait()
    with lock:
        print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
