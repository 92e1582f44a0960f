"""Real OTLP clients, each value arriving, interval after interval (DESIGN §5.9).

The OpenTelemetry JS metric exporters from npm (gRPC, HTTP/JSON, HTTP/protobuf, each with and without gzip;
`tests/clients/js`, installed by scripts/setup.sh with `npm ci`) and the OpenTelemetry Python SDK exporters
(gRPC, HTTP, each with and without gzip) each send the flows an agent would (its attributes, integer
cumulative sums, a health gauge beside them) through the bearer token, over several intervals. After every
interval the enricher's three outputs equal the truth: the re-exported OTLP points (every value, once, in
order, enriched), the flow logs (every billed flow's increments) and the /metrics aggregates.

A steady sender's requests are read from their bytes alone (processing/encoded.py) from its second request
on; only our agent's encoder had driven that path before, and a walker that mis-read another encoder's
bytes would miscount silently. So each client's reads are checked too (kzt_enricher_metric_requests and
kzt_enricher_flow_sums): protobuf requests from bytes, JSON ones decoded with their Sums read from the
layout, doubles (the JS default) point by point.
"""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
)
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.enricher.config import ExporterConfig
from otel_kzt.enricher.service import EnricherService
from tests.conftest import require
from tests.integration.test_enricher_service import (
    POD_IPS,
    Downstream,
    api_pki,
    cluster_objects,
    downstream,
    get,
    running,
    served_config,
)
from tests.support.k8s_apiserver import ENRICHER, FakeApiServer
from tests.support.k8s_objects import make_pod
from tests.support.real_clients import JS, Flow, JsClient, PythonClient

__all__ = ["api_pki", "downstream"]
TOKEN = "js-and-python-token"
INTERVALS = 6
# The flows every client sends from its own pod (on node kzt-e-a1, zone a): to each destination pod, its
# workload and the class the enricher should find.
DESTINATIONS = (
    ("cache-1", "cache", schema.TrafficClass.CROSS_ZONE.value),
    ("etl-1", "etl", schema.TrafficClass.CROSS_REGION.value),
    ("api-1", "api-7c9d8b6f5a", schema.TrafficClass.SAME_ZONE.value),  # a ReplicaSet of no Deployment
)
BILLED = {d for d, _, cls in DESTINATIONS if cls in schema.BILLED_CLASSES}
# How a client's requests are read from the second on: (requests from bytes, decoded; Sums by layout,
# point by point) per request. Every first request is decoded, its two Sums read point by point.
STEADY = {"proto": (1, 0, 2, 0), "json": (0, 1, 2, 0), "double": (0, 1, 0, 2)}
FIRST = (0, 1, 0, 2)
READS = [
    (schema.ENRICHER_METRIC_REQUESTS, schema.READ_BYTES),
    (schema.ENRICHER_METRIC_REQUESTS, schema.READ_DECODED),
    (schema.ENRICHER_FLOW_SUMS, schema.READ_LAYOUT),
    (schema.ENRICHER_FLOW_SUMS, schema.READ_POINTS),
]
Key = tuple[str, str, str, str]  # sender (its node name), metric, source address, destination address


def pod_of(client: int) -> tuple[str, str, str]:
    """(name, address, uid) of a client's own source pod."""
    return f"client-{client}", f"10.1.0.{20 + client}", f"00000000-0000-4000-8000-{client:012d}"


def flows_at(client: int, interval: int) -> list[Flow]:
    """The client's flows at `interval` (1, 2 ...) with the attributes an agent sends (ports as integers,
    its own pod's names), their cumulative values growing."""
    name, address, uid = pod_of(client)
    out = []
    for f, (destination, _, _) in enumerate(DESTINATIONS):
        attributes = {
            schema.SOURCE_ADDRESS: address,
            schema.DESTINATION_ADDRESS: POD_IPS[destination],
            schema.NETWORK_TYPE: "ipv4",
            schema.NETWORK_TRANSPORT: "tcp",
            schema.SOURCE_PORT: 31_000 + f,
            schema.DESTINATION_PORT: 443,
            schema.SOURCE_POD_NAME: name,
            schema.SOURCE_NAMESPACE_NAME: "shop",
            schema.SOURCE_POD_UID: uid,
        }
        sent = 1_000 * (client + 1) * (f + 1) * interval + 37 * interval * interval
        out.append((attributes, sent, sent // 700 + interval))
    return out


@dataclass
class Client:
    """One real client: the node name of its resource, its pod, how its requests are read, its export."""

    node: str
    pod: int
    wire: str  # a STEADY key
    export: Callable[[list[Flow]], None]
    close: Callable[[], None] = lambda: None


@pytest.fixture
def cluster_kubeconfig(tmp_path: Path, api_pki: Path) -> Iterator[Path]:
    """The test cluster plus one pod per client (a Deployment each), served by the test API server."""
    pods = []
    for client in range(12):
        name, address, uid = pod_of(client)
        owner = ("ReplicaSet", f"client{client}-6d5f9c7b8d")
        pods.append(make_pod(name, "kzt-e-a1", [address], owner=owner, uid=uid))
    with FakeApiServer(tls_dir=api_pki) as api:
        api.add_many(cluster_objects() + pods)
        yield Path(api.write_kubeconfig(tmp_path / "kubeconfig-enricher", ENRICHER))


@pytest.fixture
def guarded(cluster_kubeconfig: Path, downstream: Downstream, tmp_path: Path) -> Iterator[EnricherService]:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    exporter = ExporterConfig(f"127.0.0.1:{downstream.port}", max_elapsed_s=5.0)
    config = served_config(cluster_kubeconfig, exporters=(exporter,), bearer_token_file=str(token))
    with running(config) as svc:
        yield svc


def js_clients(svc: EnricherService) -> list[Client]:
    node = shutil.which("node")
    require(node is not None, "Node.js is not installed (scripts/setup.sh)")
    require((JS / "node_modules").is_dir(), "tests/clients/js is not installed (scripts/setup.sh: npm ci)")
    cases = [(p, c, "int") for p in ("grpc", "http-json", "http-proto") for c in ("none", "gzip")]
    cases.append(("grpc", "none", "double"))  # the JS default value type
    clients = []
    for i, (protocol, compression, value_type) in enumerate(cases):
        port = svc.ports["grpc" if protocol == "grpc" else "http"]
        url = f"http://127.0.0.1:{port}" + ("" if protocol == "grpc" else "/v1/metrics")
        name = f"js-{protocol}-{compression}-{value_type}"
        js = JsClient(protocol, url, compression, value_type, node=name, token=TOKEN)
        wire = "double" if value_type == "double" else "json" if protocol == "http-json" else "proto"
        clients.append(Client(js.name, i, wire, js.export, js.close))
    return clients


def python_clients(svc: EnricherService) -> list[Client]:
    headers = {"authorization": f"Bearer {TOKEN}"}
    grpc_url, http_url = f"127.0.0.1:{svc.ports['grpc']}", f"http://127.0.0.1:{svc.ports['http']}/v1/metrics"
    exporters: dict[str, MetricExporter] = {
        "py-grpc": GrpcExporter(endpoint=grpc_url, insecure=True, headers=headers),
        "py-grpc-gzip": GrpcExporter(
            endpoint=grpc_url, insecure=True, headers=headers, compression=grpc.Compression.Gzip
        ),
        "py-http": HttpExporter(endpoint=http_url, headers=headers),
        "py-http-gzip": HttpExporter(endpoint=http_url, headers=headers, compression=HttpCompression.Gzip),
    }
    clients = []
    for i, (name, exporter) in enumerate(exporters.items()):
        py = PythonClient(exporter, name)
        clients.append(Client(name, i, "proto", py.export, py.close))
    return clients


@dataclass
class Seen:
    """Everything the downstream receiver got so far."""

    points: dict[Key, list[tuple[int, str, str]]] = field(default_factory=dict)  # value, class, workload
    records: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=dict)  # increments

    def drain(self, ds: Downstream) -> None:
        while True:
            try:
                request: ExportMetricsServiceRequest = ds.metrics.get_nowait()
            except queue.Empty:
                break
            for rm in request.resource_metrics:
                node = next(
                    kv.value.string_value for kv in rm.resource.attributes if kv.key == "k8s.node.name"
                )
                for m in (m for sm in rm.scope_metrics for m in sm.metrics if m.name in schema.FLOW_METRICS):
                    for dp in m.sum.data_points:
                        a = {kv.key: kv.value.string_value for kv in dp.attributes}
                        value = int(getattr(dp, dp.WhichOneof("value") or "as_int"))
                        got = (value, a[schema.TRAFFIC_CLASS], a[schema.DESTINATION_WORKLOAD_NAME])
                        key = (node, m.name, a[schema.SOURCE_ADDRESS], a[schema.DESTINATION_ADDRESS])
                        self.points.setdefault(key, []).append(got)
        while True:
            try:
                logs = ds.logs.get_nowait()
            except queue.Empty:
                break
            for record in (r for rl in logs.resource_logs for sl in rl.scope_logs for r in sl.log_records):
                a = {kv.key: kv.value for kv in record.attributes}
                flow = (a[schema.SOURCE_ADDRESS].string_value, a[schema.DESTINATION_ADDRESS].string_value)
                increments = (a[schema.FLOW_LOG_BYTES].int_value, a[schema.FLOW_LOG_PACKETS].int_value)
                self.records.setdefault(flow, []).append(increments)


@dataclass
class Truth:
    """What each output must show after the intervals sent so far."""

    points: dict[Key, list[tuple[int, str, str]]] = field(default_factory=dict)
    records: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=dict)
    totals: dict[tuple[str, str, str], float] = field(default_factory=dict)  # /metrics family, src, dst wl

    def add(self, client: Client, interval: int) -> None:
        workload = f"client{client.pod}"
        now, was = flows_at(client.pod, interval), flows_at(client.pod, interval - 1)  # interval 0: nothing
        for (attrs, sent, packets), (_, sent_was, packets_was), (destination, dst_workload, cls) in zip(
            now, was, DESTINATIONS, strict=True
        ):
            src, dst = attrs[schema.SOURCE_ADDRESS], attrs[schema.DESTINATION_ADDRESS]
            for metric, value in ((schema.FLOW_BYTES, sent), (schema.FLOW_PACKETS, packets)):
                self.points.setdefault((client.node, metric, src, dst), []).append((value, cls, dst_workload))
            self.totals[(schema.PROM_FLOW_BYTES, workload, dst_workload)] = sent
            self.totals[(schema.PROM_FLOW_PACKETS, workload, dst_workload)] = packets
            if destination in BILLED:
                self.records.setdefault((src, dst), []).append((sent - sent_was, packets - packets_was))


def aggregates(svc: EnricherService) -> dict[tuple[str, str, str], float]:
    """kzt_flow_bytes / kzt_flow_packets on /metrics by (family, source workload, destination workload)."""
    body = get(f"http://127.0.0.1:{svc.ports['metrics']}/metrics")[1]
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(body):
        if family.name not in (schema.PROM_FLOW_BYTES, schema.PROM_FLOW_PACKETS):
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                src = sample.labels[schema.prom_label(schema.SOURCE_WORKLOAD_NAME)]
                dst = sample.labels[schema.prom_label(schema.DESTINATION_WORKLOAD_NAME)]
                out[(family.name, src, dst)] = out.get((family.name, src, dst), 0.0) + sample.value
    return out


def reads(svc: EnricherService) -> tuple[float, ...]:
    return tuple(
        svc.registry.get_sample_value(f"{name}_total", {schema.ENRICHER_READ_LABEL: read}) or 0.0
        for name, read in READS
    )


def settle(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Wait until `check()` holds (outputs are exported and rebuilt asynchronously), at most `timeout_s`;
    the caller then asserts what it found."""
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.parametrize("family", [js_clients, python_clients], ids=["js", "python"])
def test_real_clients_every_value_of_every_interval(
    guarded: EnricherService, downstream: Downstream, family: Callable[[EnricherService], list[Client]]
) -> None:
    clients = family(guarded)
    seen, truth = Seen(), Truth()
    how_read: dict[str, list[tuple[int, ...]]] = {c.node: [] for c in clients}
    try:
        for interval in range(1, INTERVALS + 1):
            for client in clients:  # one after another: each one's reads are told apart
                before = reads(guarded)
                client.export(flows_at(client.pod, interval))
                how_read[client.node].append(
                    tuple(int(b - a) for a, b in zip(before, reads(guarded), strict=True))
                )
                truth.add(client, interval)

            def arrived() -> bool:
                seen.drain(downstream)
                return all(len(seen.points.get(k, ())) >= len(v) for k, v in truth.points.items()) and all(
                    len(seen.records.get(k, ())) >= len(v) for k, v in truth.records.items()
                )

            settle(arrived)
            assert seen.points == truth.points, f"interval {interval}: re-exported points"
            assert seen.records == truth.records, f"interval {interval}: flow-log records"
            settle(lambda: aggregates(guarded) == truth.totals)
            assert aggregates(guarded) == truth.totals, f"interval {interval}: /metrics"
    finally:
        for client in clients:
            client.close()
    assert how_read == {c.node: [FIRST] + [STEADY[c.wire]] * (INTERVALS - 1) for c in clients}
