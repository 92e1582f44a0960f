"""Points in a free field order, through the real receivers: a request encoded by hand with exemplars, a
time written again and flags between attributes after the canonical prefix (tests/unit/
test_enricher_fieldorder.py has the drawn orders) is sent for several intervals, over gRPC and OTLP/HTTP in
turn. Downstream gets every point once, as protobuf reads it; /metrics counts each value once.
"""

from __future__ import annotations

import time

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.enricher.service import EnricherService
from tests.integration.test_enricher_badinput import METRICS_METHOD, drained, post
from tests.integration.test_enricher_service import (
    POD_IPS,
    RUN_START_NS,
    Downstream,
    api_pki,
    downstream,
    enricher_kubeconfig,
    get,
    service,
)
from tests.unit.test_enricher_fieldorder import CANONICAL, METRICS, Style, request

__all__ = ["api_pki", "downstream", "enricher_kubeconfig", "service"]
WEB = POD_IPS["web-1"]
FLOWS = ((WEB, POD_IPS["cache-1"]), (WEB, POD_IPS["api-1"]), (WEB, POD_IPS["etl-1"]))
CLASSES = ("cross-zone", "same-zone", "cross-region")
ORDERS: tuple[Style, ...] = (
    ((*CANONICAL, "exemplar"), None, False),  # the JS serializer's order, with an exemplar after
    ((*CANONICAL, "time"), None, False),  # a time again after the attributes (the later copy wins)
    (("start", "time", "value", "attr0", "flags", "attr1", "attr2"), 1, True),  # flags between, an int port
)


def counted(port: int) -> dict[str, float]:
    """kzt_flow_bytes_total by traffic class, from /metrics."""
    body = get(f"http://127.0.0.1:{port}/metrics")[1]
    return {
        s.labels[schema.TRAFFIC_CLASS.replace(".", "_")]: s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == "kzt_flow_bytes_total"
    }


@pytest.mark.integration
def test_points_in_any_field_order_are_counted_once_through_the_receivers(
    service: EnricherService, downstream: Downstream
) -> None:
    styles = {(flow, name): ORDERS[flow] for flow in range(len(FLOWS)) for name, _ in METRICS}
    channel = grpc.insecure_channel(f"127.0.0.1:{service.ports['grpc']}")
    export = channel.unary_unary(METRICS_METHOD)
    t, values = RUN_START_NS, [0, 0, 0]
    try:
        for interval in range(4):
            t += 10**9
            values = [v + 1000 * (f + 1) + interval for f, v in enumerate(values)]
            payload = request(styles, values, t, flows=FLOWS, node="kzt-e-a1", start=RUN_START_NS)
            if interval % 2:
                assert post(service.ports["http"], payload)[0] == 200
            else:
                export(payload, timeout=10)
            truth = ExportMetricsServiceRequest.FromString(payload).resource_metrics[0].scope_metrics[0]
            got = drained(downstream, 1)
            assert len(got) == 1
            forwarded = got[0].resource_metrics[0].scope_metrics[0]
            for sent, out in zip(truth.metrics, forwarded.metrics, strict=True):
                assert sent.name == out.name and len(sent.sum.data_points) == len(out.sum.data_points)
                for dp, enriched in zip(sent.sum.data_points, out.sum.data_points, strict=True):
                    assert (enriched.start_time_unix_nano, enriched.time_unix_nano) == (RUN_START_NS, t)
                    assert (enriched.as_int, enriched.exemplars, enriched.flags) == (
                        dp.as_int,
                        dp.exemplars,
                        dp.flags,
                    )
                    assert list(enriched.attributes)[: len(dp.attributes)] == list(dp.attributes)
            expected = {cls: float(v * 1500) for cls, v in zip(CLASSES, values, strict=True)}
            deadline = time.monotonic() + 10
            while (seen := counted(service.ports["metrics"])) != expected:  # rebuilt at most once a second
                assert time.monotonic() < deadline, (interval, seen, expected)
                time.sleep(0.1)
    finally:
        channel.close()
