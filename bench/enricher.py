"""Enricher throughput: data points per second per core through receive -> enrich -> re-encode.

Measured side by side in one run against
- the floor: parse the same ExportMetricsServiceRequest bytes and re-serialise them unchanged;
- a naive enricher: per point, read every attribute into a dict, resolve both ends, add KeyValue objects.
The real core (per-series cache, pre-serialised attributes, a repeated Sum read from its layout) should stay
within 2x of the floor. Steady state: the same series every interval with growing values, as agents send
them. The in-process lines on the same payloads are timed interval by interval in turns (`side_by_side`):
on a loaded machine their ratios hold better than their rates.

    .venv/bin/python bench/enricher.py [--agents 20] [--series 500] [--intervals 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client import CollectorRegistry

from bench import enricher_cluster
from bench.payloads import build_payloads, cluster_objects
from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Aggregates, AggregatesCollector, HealthMetrics
from otel_kzt.enricher.processing import native
from otel_kzt.enricher.processing.core import Core
from otel_kzt.enricher.processing.cost import load_prices
from otel_kzt.enricher.processing.flowlogs import FlowLogWriter
from otel_kzt.enricher.processing.resolution import Resolver
from otel_kzt.enricher.receivers.grpc import GrpcReceiver
from otel_kzt.enricher.receivers.settings import ReceiverSettings
from otel_kzt.k8s.decode import decode_node, decode_pod
from otel_kzt.k8s.index import ClusterIndex
from tests.support.k8s_objects import make_pod

# With --reuse scenarios: every pod IP was first held by an "old-" pod, deleted and taken over at 0.5 s,
# before the first measurement (1 s); late batches are measured at 0.25 s, while the old pods held them.
REUSED_AT_S, LATE_AT_NS = 0.5, 250_000_000
DEFAULT_CONFIG = "default configuration, enricher process CPU"
DEFAULT_CONFIG_PYTHON = "... the same, hot loops in Python"
PYTHON_CORE = "enricher core, Python loops"


def build_index(
    agents: int, pods_per_node: int, reused: bool = False
) -> tuple[ClusterIndex, list[list[str]]]:
    """A ready index: `agents` nodes over three zones, each with `pods_per_node` pods (with `reused`,
    each pod's IP has a history: another pod held it until REUSED_AT_S)."""
    index = ClusterIndex(clock=lambda: 10.0) if reused else ClusterIndex()  # fixed: nothing expires
    index.register_source("bench")
    raw_nodes, raw_pods, ips = cluster_objects(agents, pods_per_node)
    nodes, pods = [decode_node(n) for n in raw_nodes], [decode_pod(p) for p in raw_pods]
    index.replace_nodes(nodes)
    if reused:
        old = [
            decode_pod(make_pod(f"old-{i}", r.endpoint.node_name, list(r.ips))) for i, r in enumerate(pods)
        ]
        index.replace_pods(old, now=0.0)
    index.replace_pods(pods, now=REUSED_AT_S if reused else None)
    index.mark_synced("bench")
    return index, ips


class NullStream(io.RawIOBase):
    """A byte stream that keeps nothing (the JSON flow-log lines)."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        return len(memoryview(data))  # type: ignore[arg-type]


class NullSink:
    def submit_metrics(self, payload: bytes) -> None:
        """Discard: the re-encoding already happened in the core."""

    def submit_logs(self, payload: bytes) -> None:
        """Discard."""


def make_core(index: ClusterIndex, flow_logs: bool, json_lines: bool = False, python: bool = False) -> Core:
    """A core with a sink that keeps nothing; `flow_logs`: OTLP flow logs, `json_lines`: JSON lines too
    (written to a stream that keeps nothing), as in the enricher's default configuration; `python`: its
    hot loops in Python even when the C extension is built (processing/native.py)."""
    registry = CollectorRegistry()
    agg = Aggregates(schema.DEFAULT_FLOW_AGGREGATION)
    registry.register(AggregatesCollector(agg))
    core = Core(
        index,
        Resolver(index, ("10.0.0.0/8",)),
        agg,
        HealthMetrics(registry),
        load_prices(None, "aws"),
        sinks=[NullSink()],
        flow_log=FlowLogWriter(io.TextIOWrapper(NullStream(), write_through=True)) if json_lines else None,
        flow_logs_otlp=flow_logs,
    )
    if python:
        points = core._points
        points._loop = points._otlp_logs = points._json_lines = points._read_layout = None
    return core


def through(core: Core) -> Callable[[bytes], None]:
    """What a receiver does: hand the request's bytes to the core (which reads a steady request from its
    bytes alone and decodes any other, all or nothing)."""

    def run(payload: bytes) -> None:
        core.consume_encoded(payload, ExportMetricsServiceRequest.FromString)

    return run


def floor(payload: bytes) -> None:
    ExportMetricsServiceRequest.FromString(payload).SerializeToString()


def naive(resolver: Resolver) -> Callable[[bytes], None]:
    def run(payload: bytes) -> None:
        req = ExportMetricsServiceRequest.FromString(payload)
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for dp in m.sum.data_points:
                        given = {kv.key: kv.value.string_value for kv in dp.attributes}
                        for key, value in resolver.added(given, True):
                            dp.attributes.add(key=key).value.string_value = value
        req.SerializeToString()

    return run


class CheckSink(NullSink):
    """Keeps the first enriched payload so the benchmark can show it measured real work."""

    def __init__(self) -> None:
        self.first: bytes | None = None

    def submit_metrics(self, payload: bytes) -> None:
        self.first = self.first or payload


def churning(core: Core, index: ClusterIndex) -> Callable[[bytes], None]:
    """Like `through`, but a node changes before every request (the generation moves, as in a big cluster
    where pods come and go all the time): every series is re-checked against the index."""
    base = index.nodes()[0]
    run = through(core)
    count = itertools.count()

    def churn(payload: bytes) -> None:
        n = next(count)
        generation = index.generation
        index.upsert_node(
            dataclasses.replace(base, name="bench-churn", addresses=(f"192.0.2.{n % 250 + 1}",))
        )
        assert index.generation != generation
        run(payload)

    return churn


def over_grpc(index: ClusterIndex, payloads: list[list[bytes]], points: int) -> float:
    """Wall-clock data points per second through the real gRPC receiver (client in the same process)."""
    core = make_core(index, flow_logs=False)
    receiver = GrpcReceiver(ReceiverSettings("127.0.0.1", 0), core)
    port = receiver.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
            for payload in payloads[0]:
                call(payload, timeout=30)
            best = 0.0
            for row in payloads[1:]:
                t0 = time.perf_counter()
                for payload in row:
                    call(payload, timeout=30)
                best = max(best, points / (time.perf_counter() - t0))
            return best
    finally:
        receiver.shutdown()


def check_enriched(index: ClusterIndex, payload: bytes) -> None:
    core = make_core(index, flow_logs=False)
    sink = CheckSink()
    core._sinks = (sink,)
    through(core)(payload)
    assert sink.first is not None
    request = ExportMetricsServiceRequest.FromString(sink.first)
    points = [dp for m in request.resource_metrics[0].scope_metrics[0].metrics for dp in m.sum.data_points]
    wanted = {schema.TRAFFIC_CLASS, schema.DESTINATION_ZONE, schema.SOURCE_WORKLOAD_NAME}
    assert all(wanted <= {kv.key for kv in dp.attributes} for dp in points), "points were not enriched"
    before = ExportMetricsServiceRequest.FromString(payload).resource_metrics[0].scope_metrics[0].metrics[0]
    print(
        f"check: {len(points)} points enriched, {len(before.sum.data_points[0].attributes)} -> "
        f"{len(points[0].attributes)} attributes per point"
    )


def check_reuse(index: ClusterIndex, rows: list[bytes]) -> None:
    """Through one core: a point measured after the reuse names the new pod, a late one the old pod
    (values growing: a late point that adds nothing is not re-exported)."""
    core, sink = make_core(index, flow_logs=False), CheckSink()
    core._sinks = (sink,)
    for payload, prefix in zip(rows, ("app-", "old-", "app-"), strict=True):
        sink.first = None
        through(core)(payload)
        assert sink.first is not None
        dps = ExportMetricsServiceRequest.FromString(sink.first).resource_metrics[0].scope_metrics[0]
        names = {
            kv.value.string_value
            for m in dps.metrics
            for dp in m.sum.data_points
            for kv in dp.attributes
            if kv.key == schema.end_attr(schema.DESTINATION, schema.POD_NAME)
        }
        assert names and all(n.startswith(prefix) for n in names), f"expected {prefix}*: {sorted(names)[:3]}"


def measure(fn: Callable[[bytes], None], payloads: list[list[bytes]], points: int) -> float:
    """Best of the steady-state intervals (interval 0 warms caches), in data points per CPU second."""
    return side_by_side({"": fn}, payloads, points)[""]


def side_by_side(
    fns: dict[str, Callable[[bytes], None]], payloads: list[list[bytes]], points: int
) -> dict[str, float]:
    """`measure` for several at once, interval by interval in turns (the order rotating), so that load
    from elsewhere on the machine falls on all of them alike: their ratios are what to read."""
    names = list(fns)
    for name in names:
        for payload in payloads[0]:
            fns[name](payload)
    best = dict.fromkeys(names, 0.0)
    for i, row in enumerate(payloads[1:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.process_time()
            for payload in row:
                fns[name](payload)
            best[name] = max(best[name], points / max(time.process_time() - t0, 1e-9))
    return best


def floor_now(rows: list[list[bytes]], points: int) -> float:
    """The floor's rate (best of the rows after the first), timed now: beside each process run."""
    return side_by_side({"": floor}, rows, points)[""]


def default_configuration(
    agents: int, series: int, intervals: int, rounds: int, floor_rows: list[list[bytes]]
) -> tuple[dict[str, float], dict[str, float]]:
    """The real enricher process (`enricher_cluster.run`) with its hot loops in C and in Python
    (OTEL_KZT_NO_NATIVE=1), one process after the other in `rounds` alternating rounds: each path's
    median of its processes' best steady interval, in data points per CPU second; and each path's
    median ratio to the floor timed just before its run on `floor_rows` (the machine's speed drifts
    between the in-process lines and these runs: the floor moved 11-23 ms an interval within minutes)."""
    rates: dict[str, list[float]] = {DEFAULT_CONFIG: [], DEFAULT_CONFIG_PYTHON: []}
    ratios: dict[str, list[float]] = {name: [] for name in rates}
    points = agents * series * 2
    runs: dict[str, list[enricher_cluster.Result]] = {name: [] for name in rates}
    saved = os.environ.get(native.DISABLE_ENV)
    try:
        for i in range(rounds):
            for name in list(rates)[i % 2 :] + list(rates)[: i % 2]:
                if name == DEFAULT_CONFIG_PYTHON:
                    os.environ[native.DISABLE_ENV] = "1"
                else:
                    os.environ.pop(native.DISABLE_ENV, None)
                base = floor_now(floor_rows, points)
                run = enricher_cluster.run(agents, series, 2, intervals)
                runs[name].append(run)
                per_interval = run.received / len(run.interval_cpu_s)
                rates[name].append(per_interval / max(min(run.interval_cpu_s[1:]), 1e-9))
                ratios[name].append(base / rates[name][-1])
    finally:
        os.environ.pop(native.DISABLE_ENV, None)
        if saved is not None:
            os.environ[native.DISABLE_ENV] = saved
    for name, got in rates.items():
        print(f"{name}: " + ", ".join(f"{r:,.0f}" for r in got) + " dp/s per core")
        print("  x the floor timed beside each run: " + ", ".join(f"{r:.2f}x" for r in ratios[name]))
        # by thread, the steady intervals of every run: CPU, and the counts that hold under load
        cpu, faults, switches = (
            [counts for run in runs[name] for counts in getattr(run, kind)[1:]]
            for kind in ("roles_cpu_s", "roles_faults", "roles_switches")
        )
        print(f"  CPU by thread per steady interval, ms: {enricher_cluster.events_line(cpu, scale=1000)}")
        print(f"  minor faults by thread per steady interval: {enricher_cluster.events_line(faults)}")
        print(f"  context switches by thread per steady interval: {enricher_cluster.events_line(switches)}")
    return (
        {name: statistics.median(got) for name, got in rates.items()},
        {name: statistics.median(got) for name, got in ratios.items()},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--series", type=int, default=500, help="flows per agent (x2 metrics)")
    parser.add_argument("--intervals", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="default-configuration runs of each path")
    parser.add_argument("--cluster-agents", type=int, default=1000, help="cluster-scale run (0: skip)")
    args = parser.parse_args()
    if args.intervals < 3 or args.agents < 1 or args.series < 1 or args.cluster_agents < 0 or args.rounds < 1:
        parser.error(
            "--intervals >= 3 (the reuse check reads three), --agents and --series >= 1, "
            "--cluster-agents >= 0, --rounds >= 1"
        )
    index, ips = build_index(args.agents, 30)
    payloads = build_payloads(ips, args.series, args.intervals)
    points = args.agents * args.series * 2
    check_enriched(index, payloads[0][0])
    churned, _ = build_index(args.agents, 30)  # its own: the churn moves the index's generation
    results = side_by_side(
        {
            "floor (parse + re-serialise)": floor,
            "enricher core": through(make_core(index, flow_logs=False)),
            "enricher core + OTLP flow logs": through(make_core(index, flow_logs=True)),
            "enricher core + JSON and OTLP flow logs": through(make_core(index, True, json_lines=True)),
            PYTHON_CORE: through(make_core(index, flow_logs=False, python=True)),
            "... + JSON and OTLP flow logs, Python loops": through(make_core(index, True, True, python=True)),
            "enricher core, metadata churning": churning(make_core(churned, False), churned),
            "naive attribute loop": naive(Resolver(index, ("10.0.0.0/8",))),
        },
        payloads,
        points,
    )
    reused, _ = build_index(args.agents, 30, reused=True)
    late = build_payloads(ips, args.series, args.intervals, at_ns=LATE_AT_NS)
    check_reuse(reused, [payloads[0][0], late[1][0], payloads[2][0]])
    mixed = [late[i] if i % 2 else row for i, row in enumerate(payloads)]  # every series switches owner
    results["enricher core, every IP reused once"] = measure(
        through(make_core(reused, False)), payloads, points
    )
    results["enricher core, late batches across reuse"] = measure(
        through(make_core(reused, False)), mixed, points
    )
    results["through the gRPC receiver, wall clock"] = over_grpc(index, payloads, points)
    # the real enricher process, default configuration: flow logs on (JSON lines on its stdout, OTLP
    # records), the real gRPC receiver, an exporter to a downstream process; its CPU from /proc, the best
    # interval after the first (series known), as `measure` takes the best interval of the in-process
    # lines; 2 senders. Its hot loops in C (when built) and in Python, in alternating processes.
    processes, beside = default_configuration(args.agents, args.series, args.intervals, args.rounds, payloads)
    results.update(processes)
    base = results["floor (parse + re-serialise)"]
    print(
        f"{points} data points per interval ({args.agents} agents x {args.series} flows x 2 metrics); "
        f"flow logs cover the billed ~2/3 of flows (3 zones)"
    )
    for name, rate in results.items():
        unit = "dp/s (wall, 2 threads)" if "wall" in name else "dp/s per core"
        print(f"{name:40s} {rate:12,.0f} {unit:24s} {base / rate:5.2f}x the floor")
    core, whole = base / results["enricher core"], base / results[DEFAULT_CONFIG]
    print(
        f"ratios: enricher core {core:.2f}x (target <= 2x), default configuration {whole:.2f}x (<= 3x); "
        f"to the floor timed beside each run {beside[DEFAULT_CONFIG]:.2f}x (median)"
    )
    core_py, whole_py = base / results[PYTHON_CORE], base / results[DEFAULT_CONFIG_PYTHON]
    print(
        f"  hot loops: {native.PATH}; in Python: core {core_py:.2f}x, default configuration {whole_py:.2f}x "
        f"(beside each run {beside[DEFAULT_CONFIG_PYTHON]:.2f}x)"
    )
    if args.cluster_agents:
        scale = (args.cluster_agents, 100, 8, 4)  # the real enricher process at cluster scale, same run
        enricher_cluster.report(enricher_cluster.run(*scale), *scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
