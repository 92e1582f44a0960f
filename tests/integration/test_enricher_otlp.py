"""Real OTLP clients in, a real OTLP receiver out: the OpenTelemetry Python SDK's gRPC and HTTP exporters
send kzt.flow.* cumulative sums to the enricher; a downstream gRPC receiver gets them enriched, plus the
flow-log records; /metrics shows the kubezonnet metric.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from otel_kzt import schema
from otel_kzt.enricher.service import EnricherService
from tests.integration.test_enricher_service import (
    NODE_IPS,
    POD_IPS,
    Downstream,
    api_pki,
    downstream,
    enricher_kubeconfig,
    get,
    service,
)

# fixtures re-used from the service tests
__all__ = ["api_pki", "downstream", "enricher_kubeconfig", "service"]

Flow = tuple[str, str, int]  # source address, destination address, cumulative bytes


def send_with_sdk(exporter: MetricExporter, flows: Iterable[Flow], node: str = "kzt-e-a1") -> None:
    """One collection of an SDK ObservableCounter (cumulative monotonic Sum) exported once."""
    flows = list(flows)

    def observe(metric: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            for src, dst, value in flows:
                attrs = {
                    schema.SOURCE_ADDRESS: src,
                    schema.DESTINATION_ADDRESS: dst,
                    schema.NETWORK_TRANSPORT: "tcp",
                    schema.DESTINATION_PORT: "443",
                }
                yield Observation(value if metric == schema.FLOW_BYTES else value // 1000, attrs)

        return callback

    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    resource = Resource.create(
        {schema.SERVICE_NAME: schema.AGENT_SERVICE_NAME, schema.RESOURCE_NODE_NAME: node}
    )
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = provider.get_meter("otel_kzt.agent")
    meter.create_observable_counter(
        schema.FLOW_BYTES, [observe(schema.FLOW_BYTES)], unit=schema.FLOW_BYTES_UNIT
    )
    meter.create_observable_counter(schema.FLOW_PACKETS, [observe(schema.FLOW_PACKETS)], unit="{packet}")
    assert provider.force_flush(10_000)
    provider.shutdown()


def enriched_points(ds: Downstream, want: int) -> dict[tuple[str, str, str], dict[str, str]]:
    """(metric, src, dst) -> attributes of the points the downstream receiver got."""
    found: dict[tuple[str, str, str], dict[str, str]] = {}
    while len(found) < want:
        try:
            request: ExportMetricsServiceRequest = ds.metrics.get(timeout=10)
        except queue.Empty:
            raise AssertionError(f"downstream got only {sorted(found)}") from None
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for dp in m.sum.data_points:
                        a = {kv.key: kv.value.string_value for kv in dp.attributes}
                        found[(m.name, a[schema.SOURCE_ADDRESS], a[schema.DESTINATION_ADDRESS])] = a
    return found


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sdk_exporters_in_enriched_data_out(
    service: EnricherService, downstream: Downstream, protocol: str
) -> None:
    if protocol == "grpc":
        exporter: MetricExporter = GrpcMetricExporter(
            endpoint=f"127.0.0.1:{service.ports['grpc']}", insecure=True
        )
    else:
        exporter = HttpMetricExporter(endpoint=f"http://127.0.0.1:{service.ports['http']}/v1/metrics")
    web, cache, etl = POD_IPS["web-1"], POD_IPS["cache-1"], POD_IPS["etl-1"]
    flows = [
        (web, cache, 5_000_000),
        (web, POD_IPS["api-1"], 7_000),
        (web, etl, 3_000),
        (web, "1.1.1.1", 9_000),
        (web, NODE_IPS["kzt-e-b1"], 4_000),
    ]
    send_with_sdk(exporter, flows)
    points = enriched_points(downstream, 2 * len(flows))
    cross = points[(schema.FLOW_BYTES, web, cache)]
    assert cross[schema.TRAFFIC_CLASS] == "cross-zone"
    assert cross[schema.SOURCE_POD_NAME] == "web-1" and cross[schema.DESTINATION_POD_NAME] == "cache-1"
    assert cross[schema.SOURCE_WORKLOAD_KIND] == "Deployment" and cross[schema.SOURCE_WORKLOAD_NAME] == "web"
    assert cross[schema.DESTINATION_WORKLOAD_KIND] == "StatefulSet"
    assert (cross[schema.SOURCE_ZONE], cross[schema.DESTINATION_ZONE]) == ("us-east-1a", "us-east-1b")
    assert cross[schema.DESTINATION_NODE_NAME] == "kzt-e-b1" and cross[schema.SOURCE_REGION] == "us-east-1"
    assert cross[schema.DESTINATION_PORT] == "443"  # the sender's attributes stay
    assert points[(schema.FLOW_PACKETS, web, cache)][schema.TRAFFIC_CLASS] == "cross-zone"
    assert points[(schema.FLOW_BYTES, web, POD_IPS["api-1"])][schema.TRAFFIC_CLASS] == "same-zone"
    assert points[(schema.FLOW_BYTES, web, etl)][schema.TRAFFIC_CLASS] == "cross-region"
    assert points[(schema.FLOW_BYTES, web, "1.1.1.1")][schema.TRAFFIC_CLASS] == "external"
    node_end = points[(schema.FLOW_BYTES, web, NODE_IPS["kzt-e-b1"])]
    assert (
        node_end[schema.DESTINATION_WORKLOAD_KIND] == "Node" and schema.DESTINATION_POD_NAME not in node_end
    )

    logs = downstream.logs.get(timeout=10)
    records = [r for rl in logs.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    classes = sorted(
        next(kv.value.string_value for kv in r.attributes if kv.key == schema.TRAFFIC_CLASS) for r in records
    )
    assert classes == ["cross-region", "cross-zone", "cross-zone", "external"]

    body = get(f"http://127.0.0.1:{service.ports['metrics']}/metrics")[1]
    assert 'pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-1"} 5.00' in body
    assert 'kzt_enricher_agent_last_report_timestamp_seconds{k8s_node_name="kzt-e-a1"}' in body


@pytest.mark.integration
def test_logs_pass_through_json_with_hex_ids(service: EnricherService, downstream: Downstream) -> None:
    import gzip
    import json

    from tests.integration.test_enricher_badinput import post

    trace_id, span_id = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    body = {
        "resourceLogs": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "app"}}]},
                "scopeLogs": [
                    {
                        "logRecords": [
                            {
                                "timeUnixNano": "1700000000000000000",
                                "severityNumber": 9,
                                "body": {"stringValue": "hi"},
                                "traceId": trace_id,
                                "spanId": span_id,
                            }
                        ]
                    }
                ],
            }
        ]
    }
    status, _, _ = post(
        service.ports["http"],
        gzip.compress(json.dumps(body).encode()),
        "application/json",
        path="/v1/logs",
        headers={"Content-Encoding": "gzip"},
    )
    assert status == 200
    got = downstream.logs.get(timeout=10)
    record = got.resource_logs[0].scope_logs[0].log_records[0]
    assert record.trace_id == bytes.fromhex(trace_id) and record.span_id == bytes.fromhex(span_id)
    assert record.body.string_value == "hi" and record.severity_number == 9
