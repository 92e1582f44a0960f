"""Real OTLP clients, each value arriving (DESIGN §5.9): the OpenTelemetry JS metric exporters from npm
(gRPC, HTTP/JSON, HTTP/protobuf, each with and without gzip; `tests/clients/js`, installed by
scripts/setup.sh with `npm ci`) and the OpenTelemetry Python SDK exporters, all through the bearer token,
against the running enricher; a downstream gRPC receiver must get every value they sent, enriched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from otel_kzt import schema
from otel_kzt.enricher.config import ExporterConfig
from otel_kzt.enricher.service import EnricherService
from tests.conftest import require
from tests.integration.test_enricher_otlp import send_with_sdk
from tests.integration.test_enricher_service import (
    POD_IPS,
    Downstream,
    api_pki,
    downstream,
    enricher_kubeconfig,
    running,
    served_config,
)

__all__ = ["api_pki", "downstream", "enricher_kubeconfig"]
JS = Path(__file__).resolve().parents[1] / "clients" / "js"
TOKEN = "js-and-python-token"
CASES = [(p, c) for p in ("grpc", "http-json", "http-proto") for c in ("none", "gzip")]


@pytest.fixture
def guarded(enricher_kubeconfig: Path, downstream: Downstream, tmp_path: Path) -> Iterator[EnricherService]:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    exporter = ExporterConfig(f"127.0.0.1:{downstream.port}", max_elapsed_s=5.0)
    config = served_config(enricher_kubeconfig, exporters=(exporter,), bearer_token_file=str(token))
    with running(config) as svc:
        yield svc


def forwarded_bytes(ds: Downstream, want: int) -> dict[str, int]:
    """node name -> the kzt.flow.bytes value forwarded for it, until `want` nodes have arrived."""
    got: dict[str, int] = {}
    while len(got) < want:
        request: ExportMetricsServiceRequest = ds.metrics.get(timeout=15)
        for rm in request.resource_metrics:
            node = next(kv.value.string_value for kv in rm.resource.attributes if kv.key == "k8s.node.name")
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == schema.FLOW_BYTES:
                        (point,) = m.sum.data_points
                        names = {kv.key for kv in point.attributes}
                        assert schema.TRAFFIC_CLASS in names, "forwarded enriched"
                        # JS observable counters are doubles unless told otherwise; either way, the value
                        got[node] = int(getattr(point, point.WhichOneof("value") or "as_int"))
    return got


@pytest.mark.integration
def test_opentelemetry_js_exporters_deliver_every_value(
    guarded: EnricherService, downstream: Downstream
) -> None:
    node = shutil.which("node")
    require(node is not None, "Node.js is not installed (scripts/setup.sh)")
    require((JS / "node_modules").is_dir(), "tests/clients/js is not installed (scripts/setup.sh: npm ci)")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {TOKEN}"}
    sent = {}
    for i, (protocol, compression) in enumerate(CASES):
        value = 1000 * (i + 1) + 7
        port = guarded.ports["grpc" if protocol == "grpc" else "http"]
        url = f"http://127.0.0.1:{port}" + ("" if protocol == "grpc" else "/v1/metrics")
        flows = json.dumps([[POD_IPS["web-1"], POD_IPS["cache-1"], value]])
        done = subprocess.run(
            [str(node), "send.js", protocol, url, compression, flows],
            cwd=JS,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{protocol}/{compression}: {done.stderr}"
        sent[f"js-{protocol}-{compression}"] = value
    assert forwarded_bytes(downstream, len(sent)) == sent


@pytest.mark.integration
def test_opentelemetry_python_exporters_deliver_every_value(
    guarded: EnricherService, downstream: Downstream
) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    grpc_url, http_url = f"127.0.0.1:{guarded.ports['grpc']}", f"http://127.0.0.1:{guarded.ports['http']}"
    exporters = {
        "py-grpc": GrpcExporter(endpoint=grpc_url, insecure=True, headers=headers),
        "py-grpc-gzip": GrpcExporter(
            endpoint=grpc_url, insecure=True, headers=headers, compression=grpc.Compression.Gzip
        ),
        "py-http": HttpExporter(endpoint=f"{http_url}/v1/metrics", headers=headers),
        "py-http-gzip": HttpExporter(
            endpoint=f"{http_url}/v1/metrics", headers=headers, compression=HttpCompression.Gzip
        ),
    }
    sent = {}
    for i, (name, exporter) in enumerate(exporters.items()):
        sent[name] = 2000 * (i + 1) + 3
        send_with_sdk(exporter, [(POD_IPS["web-1"], POD_IPS["cache-1"], sent[name])], node=name)
    assert forwarded_bytes(downstream, len(sent)) == sent
