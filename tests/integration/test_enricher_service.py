"""The enricher service in-process: start/stop contract, health endpoints, and shared test helpers.

Helpers here (the cluster's objects as a metadata file or served by the test API server, a downstream OTLP
gRPC receiver, a running service) are imported by the other enricher integration tests. The `service`
fixture reads metadata as in a cluster: through the RBAC-enforcing API server over verified HTTPS with the
enricher's own token; the file (`--kube-metadata`, a product feature) stays where a test is about it or
needs no API server. Everything binds port 0 on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from otel_kzt.enricher.config import EnricherConfig, ExporterConfig
from otel_kzt.enricher.service import EnricherService
from otel_kzt.k8s import ClusterIndex
from tests.support.k8s_apiserver import ENRICHER, FakeApiServer
from tests.support.k8s_objects import as_list, make_node, make_pod

LOCAL = "127.0.0.1:0"
# Agents' run start times in these tests (2096): later than any enricher start-up. A run that began before
# the enricher started is a baseline and counts nothing (DESIGN §4), which tests/unit/ show on their own.
RUN_START_NS = 4_000_000_000 * 10**9
# Two zones of one region plus a node of another region; pods named after what they are.
POD_IPS = {
    "web-1": "10.1.0.1",  # node a1, zone a
    "api-1": "10.1.0.3",  # node a2, zone a
    "cache-1": "10.1.1.2",  # node b1, zone b
    "etl-1": "10.2.0.4",  # node r2, other region
}
NODE_IPS = {
    "kzt-e-a1": "192.168.50.1",
    "kzt-e-a2": "192.168.50.2",
    "kzt-e-b1": "192.168.50.3",
    "kzt-e-r2": "192.168.50.4",
}


def cluster_objects() -> list[dict[str, Any]]:
    """The Nodes and Pods of these tests (two zones of one region, a node of another region)."""
    nodes = [
        make_node("kzt-e-a1", [NODE_IPS["kzt-e-a1"]], zone="us-east-1a", provider_id="aws:///us-east-1a/i-1"),
        make_node("kzt-e-a2", [NODE_IPS["kzt-e-a2"]], zone="us-east-1a", provider_id="aws:///us-east-1a/i-2"),
        make_node("kzt-e-b1", [NODE_IPS["kzt-e-b1"]], zone="us-east-1b", provider_id="aws:///us-east-1b/i-3"),
        make_node("kzt-e-r2", [NODE_IPS["kzt-e-r2"]], zone="eu-west-1a", region="eu-west-1"),
    ]
    pods = [
        make_pod("web-1", "kzt-e-a1", [POD_IPS["web-1"]], owner=("ReplicaSet", "web-6d5f9c7b8d")),
        make_pod("api-1", "kzt-e-a2", [POD_IPS["api-1"]], owner=("ReplicaSet", "api-7c9d8b6f5a")),
        make_pod(
            "cache-1", "kzt-e-b1", [POD_IPS["cache-1"]], owner=("StatefulSet", "cache"), template_hash=None
        ),
        make_pod(
            "etl-1",
            "kzt-e-r2",
            [POD_IPS["etl-1"]],
            namespace="batch",
            owner=("Job", "etl"),
            template_hash=None,
        ),
    ]
    return nodes + pods


def write_metadata(path: Path) -> Path:
    path.write_text(json.dumps(as_list(cluster_objects())))
    return path


class Downstream:
    """A real OTLP/gRPC receiver (metrics and logs) that queues what it gets."""

    def __init__(self) -> None:
        self.metrics: queue.Queue[ExportMetricsServiceRequest] = queue.Queue()
        self.logs: queue.Queue[ExportLogsServiceRequest] = queue.Queue()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handlers = {
            "opentelemetry.proto.collector.metrics.v1.MetricsService": (
                self._metrics,
                ExportMetricsServiceRequest,
                ExportMetricsServiceResponse,
            ),
            "opentelemetry.proto.collector.logs.v1.LogsService": (
                self._logs,
                ExportLogsServiceRequest,
                ExportLogsServiceResponse,
            ),
        }
        for service, (fn, req, resp) in handlers.items():
            method = grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )
            self.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, {"Export": method}),)
            )
        self.port = self.server.add_insecure_port(LOCAL)
        self.server.start()

    def _metrics(self, request: ExportMetricsServiceRequest, _ctx: object) -> ExportMetricsServiceResponse:
        self.metrics.put(request)
        return ExportMetricsServiceResponse()

    def _logs(self, request: ExportLogsServiceRequest, _ctx: object) -> ExportLogsServiceResponse:
        self.logs.put(request)
        return ExportLogsServiceResponse()

    def stop(self) -> None:
        self.server.stop(0).wait()


def served_config(kubeconfig: Path, **kw: object) -> EnricherConfig:
    """`local_config` reading metadata through the API server `kubeconfig` names."""
    return local_config(None, kubeconfig=str(kubeconfig), **kw)


def local_config(metadata: Path | None, **kw: object) -> EnricherConfig:
    """`metadata`: a metadata file, or None with `kubeconfig=` (the API server)."""
    return replace(
        EnricherConfig(
            grpc_endpoint=LOCAL,
            http_endpoint=LOCAL,
            metrics_endpoint=LOCAL,
            kube_metadata=str(metadata) if metadata is not None else None,
            cluster_cidrs=("10.0.0.0/8",),
            flow_logs_stdout=False,
            shutdown_timeout_s=2.0,
        ),
        **kw,
    )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics_showing(url: str, text: str, timeout_s: float = 5.0) -> str:
    """The /metrics body at `url` once it holds `text` (the exposition is rebuilt at most once a second)."""
    deadline = time.monotonic() + timeout_s
    while text not in (body := get(url)[1]):
        assert time.monotonic() < deadline, f"/metrics never showed {text!r}"
        time.sleep(0.1)
    return body


def wait_ready(service: EnricherService, timeout_s: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if get(f"http://127.0.0.1:{service.ports['metrics']}/readyz")[0] == 200:
            return
        event.wait(0.05)
    raise AssertionError("enricher never became ready")


@contextlib.contextmanager
def running(config: EnricherConfig) -> Iterator[EnricherService]:
    """A started, ready service, shut down on exit (also when the test fails)."""
    svc = EnricherService(config)
    try:
        svc.start()
        wait_ready(svc)
        yield svc
    finally:
        svc.shutdown()


@pytest.fixture
def downstream() -> Iterator[Downstream]:
    ds = Downstream()
    try:
        yield ds
    finally:
        ds.stop()


@pytest.fixture
def metadata_file(tmp_path: Path) -> Path:
    return write_metadata(tmp_path / "cluster.json")


@pytest.fixture(scope="session")
def api_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA and serving certificate for the session's test API servers."""
    return tmp_path_factory.mktemp("pki")


@pytest.fixture
def enricher_kubeconfig(tmp_path: Path, api_pki: Path) -> Iterator[Path]:
    """The enricher's kubeconfig for a test API server (HTTPS, RBAC) serving `cluster_objects()`."""
    with FakeApiServer(tls_dir=api_pki) as api:
        api.add_many(cluster_objects())
        yield Path(api.write_kubeconfig(tmp_path / "kubeconfig-enricher", ENRICHER))


@pytest.fixture
def service(enricher_kubeconfig: Path, downstream: Downstream) -> Iterator[EnricherService]:
    exporter = ExporterConfig(f"127.0.0.1:{downstream.port}", max_elapsed_s=5.0)
    with running(served_config(enricher_kubeconfig, exporters=(exporter,), max_request_bytes=1 << 20)) as svc:
        yield svc


class ManualMetadata:
    """A metadata handle over the real ClusterIndex whose first sync the test decides."""

    def __init__(self) -> None:
        self.index = ClusterIndex()

    def start(self) -> None:
        self.index.register_source("manual")

    def shutdown(self) -> None:
        """Nothing runs in the background."""


def test_health_and_readiness_follow_metadata(metadata_file: Path) -> None:
    metadata = ManualMetadata()
    svc = EnricherService(local_config(metadata_file), metadata=metadata)
    try:
        svc.start()
        base = f"http://127.0.0.1:{svc.ports['metrics']}"
        assert get(f"{base}/healthz")[0] == 200
        assert get(f"{base}/readyz")[0] == 503
        status, body = get(f"{base}/metrics")
        assert status == 200 and "kzt_enricher_metadata_synced 0.0" in body
        metadata.index.mark_synced("manual")
        wait_ready(svc)
        metrics_showing(f"{base}/metrics", "kzt_enricher_metadata_synced 1.0")
    finally:
        svc.shutdown()
        svc.shutdown()  # safe twice


def test_shutdown_before_start_and_restart_on_same_ports(metadata_file: Path) -> None:
    EnricherService(local_config(metadata_file)).shutdown()
    first = EnricherService(local_config(metadata_file))
    first.start()
    ports = dict(first.ports)
    first.shutdown()
    again = EnricherService(
        local_config(
            metadata_file,
            grpc_endpoint=f"127.0.0.1:{ports['grpc']}",
            http_endpoint=f"127.0.0.1:{ports['http']}",
            metrics_endpoint=f"127.0.0.1:{ports['metrics']}",
        )
    )
    try:
        again.start()
        assert again.ports == ports
    finally:
        again.shutdown()


def test_half_finished_start_is_undone(metadata_file: Path) -> None:
    first = EnricherService(local_config(metadata_file))
    first.start()
    try:
        clash = EnricherService(local_config(metadata_file, grpc_endpoint=f"127.0.0.1:{first.ports['http']}"))
        with pytest.raises((OSError, RuntimeError)):
            clash.start()
        # what the failed start had bound (its metrics and HTTP ports) is free again
        assert clash.ports and all(p != first.ports["http"] for k, p in clash.ports.items() if k != "grpc")
        clash.shutdown()
        for port in (clash.ports["metrics"], clash.ports["http"]):
            reuse = EnricherService(local_config(metadata_file, metrics_endpoint=f"127.0.0.1:{port}"))
            reuse.start()
            reuse.shutdown()
    finally:
        first.shutdown()
