"""Bad input of every kind gets the OTLP-specified answer, nothing half-parsed is forwarded, and the
service keeps serving (DESIGN §5.5). Real HTTP and gRPC clients against the running service.
"""

from __future__ import annotations

import gzip
import http.client
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from otel_kzt import schema
from otel_kzt.enricher.service import EnricherService
from tests.integration.test_enricher_service import (
    POD_IPS,
    RUN_START_NS,
    Downstream,
    api_pki,
    downstream,
    enricher_kubeconfig,
    local_config,
    metadata_file,
    running,
    service,
)

__all__ = ["api_pki", "downstream", "enricher_kubeconfig", "metadata_file", "service"]
METRICS_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PB = "application/x-protobuf"


def flow_json(points: list[tuple[str, str, object]]) -> dict[str, object]:
    """OTLP/JSON: lowerCamelCase, int64 as strings, integer enums."""
    dps = []
    for src, dst, value in points:
        attrs = [
            {"key": k, "value": {"stringValue": v}}
            for k, v in ((schema.SOURCE_ADDRESS, src), (schema.DESTINATION_ADDRESS, dst))
            if v
        ]
        key = "asDouble" if isinstance(value, float) or value == "NaN" else "asInt"
        start, t = str(RUN_START_NS), str(RUN_START_NS + 10**9)
        dps.append({"attributes": attrs, "startTimeUnixNano": start, "timeUnixNano": t, key: value})
    metric = {
        "name": schema.FLOW_BYTES,
        "unit": "By",
        "sum": {"aggregationTemporality": 2, "isMonotonic": True, "dataPoints": dps},
    }
    return {"resourceMetrics": [{"resource": {"attributes": []}, "scopeMetrics": [{"metrics": [metric]}]}]}


def good_request() -> ExportMetricsServiceRequest:
    from google.protobuf import json_format

    return json_format.ParseDict(
        flow_json([(POD_IPS["web-1"], POD_IPS["cache-1"], "123")]), ExportMetricsServiceRequest()
    )


def post(
    port: int,
    body: bytes,
    content_type: str = PB,
    path: str = "/v1/metrics",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def drained(ds: Downstream, expect: int, deadline_s: float = 30.0) -> list[ExportMetricsServiceRequest]:
    """What the downstream got, one request per resource (the exporter batches requests queued together):
    waits up to `deadline_s` for `expect` of them (a loaded machine is slow), then 1 s more for any extra."""
    out: list[ExportMetricsServiceRequest] = []
    deadline = time.monotonic() + deadline_s
    while True:
        wait = max(0.0, deadline - time.monotonic()) if len(out) < expect else 1.0
        try:
            batch = ds.metrics.get(timeout=wait)
        except queue.Empty:
            return out
        for rm in batch.resource_metrics:
            one = ExportMetricsServiceRequest()
            one.resource_metrics.append(rm)
            out.append(one)


@pytest.mark.integration
def test_http_bad_input_answers(service: EnricherService, downstream: Downstream) -> None:
    port = service.ports["http"]
    valid = good_request().SerializeToString()
    cases = [
        ("garbage protobuf", b"\xff\xff\xff\xff\x0f", PB, {}, 400),
        ("truncated protobuf", valid[: len(valid) // 2], PB, {}, 400),
        ("not JSON", b"{resourceMetrics: ", "application/json", {}, 400),
        ("wrong JSON shape", b'{"resourceMetrics": 5}', "application/json", {}, 400),
        ("too large", b"\x00" * (2 << 20), PB, {}, 413),
        ("gzip bomb", gzip.compress(b"\x00" * (64 << 20)), PB, {"Content-Encoding": "gzip"}, 413),
        ("not gzip", valid, PB, {"Content-Encoding": "gzip"}, 400),
        ("unknown encoding", valid, PB, {"Content-Encoding": "br"}, 415),
        ("wrong content type", valid, "text/plain", {}, 415),
    ]
    for name, body, ctype, headers, want in cases:
        status, _, reply = post(port, body, ctype, headers=headers)
        assert status == want, name
        assert status_pb2.Status.FromString(reply).message if ctype == PB else reply, name
    assert post(port, valid, path="/v1/traces")[0] == 404

    # NaN, negative and missing addresses: partial success, the rest goes on
    mixed = flow_json(
        [
            (POD_IPS["web-1"], POD_IPS["cache-1"], "10"),
            (POD_IPS["web-1"], POD_IPS["api-1"], "NaN"),
            (POD_IPS["web-1"], POD_IPS["etl-1"], "-5"),
            (POD_IPS["web-1"], "", "7"),
        ]
    )
    status, _, reply = post(port, json.dumps(mixed).encode(), "application/json")
    assert status == 200
    partial = json.loads(reply)["partialSuccess"]
    assert int(partial["rejectedDataPoints"]) == 3 and "NaN or negative" in partial["errorMessage"]

    # still serving; gzip works
    status, _, reply = post(port, gzip.compress(valid), headers={"Content-Encoding": "gzip"})
    assert status == 200 and not ExportMetricsServiceResponse.FromString(reply).HasField("partial_success")
    forwarded = drained(downstream, 2)
    assert len(forwarded) == 2  # the partial one and the gzip one; nothing of the refused requests
    first = forwarded[0].resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
    assert [dp.as_int for dp in first] == [10]


@pytest.mark.integration
def test_grpc_bad_input_answers(service: EnricherService, downstream: Downstream) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.ports['grpc']}") as channel:
        call = channel.unary_unary(METRICS_METHOD)
        for body, want in [
            (b"\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT),
            (b"\x0a" + b"\xff" * (2 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(body, timeout=10)
            assert info.value.code() == want
        nan = flow_json([(POD_IPS["web-1"], POD_IPS["cache-1"], "NaN")])
        from google.protobuf import json_format

        request = json_format.ParseDict(nan, ExportMetricsServiceRequest())
        reply = ExportMetricsServiceResponse.FromString(call(request.SerializeToString(), timeout=10))
        assert reply.partial_success.rejected_data_points == 1
        assert ExportMetricsServiceResponse.FromString(call(good_request().SerializeToString(), timeout=10))
    assert len(drained(downstream, 2)) == 2


@pytest.mark.integration
def test_overloaded_core_answers_retry_later(service: EnricherService) -> None:
    assert service.core is not None
    slots = service.core._slots
    held = 0
    while slots.acquire(blocking=False):
        held += 1
    try:
        status, headers, _ = post(service.ports["http"], good_request().SerializeToString())
        assert status == 503 and int(headers["Retry-After"]) >= 1
        channel = grpc.insecure_channel(f"127.0.0.1:{service.ports['grpc']}")
        with channel, pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(METRICS_METHOD)(good_request().SerializeToString(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        details = dict(info.value.trailing_metadata())["grpc-status-details-bin"]
        retry = error_details_pb2.RetryInfo()
        assert (
            status_pb2.Status.FromString(details).details[0].Unpack(retry) and retry.retry_delay.seconds >= 1
        )
    finally:
        for _ in range(held):
            slots.release()
    assert post(service.ports["http"], good_request().SerializeToString())[0] == 200


@pytest.fixture
def token_service(metadata_file: Path, tmp_path: Path) -> Iterator[EnricherService]:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with running(local_config(metadata_file, bearer_token_file=str(token))) as svc:
        yield svc


@pytest.mark.integration
def test_bearer_token_required_on_both_receivers(token_service: EnricherService) -> None:
    body = good_request().SerializeToString()
    assert post(token_service.ports["http"], body)[0] == 401
    assert post(token_service.ports["http"], body, headers={"Authorization": "Bearer nope"})[0] == 401
    assert post(token_service.ports["http"], body, headers={"Authorization": "Bearer s3cret"})[0] == 200
    with grpc.insecure_channel(f"127.0.0.1:{token_service.ports['grpc']}") as channel:
        call = channel.unary_unary(METRICS_METHOD)
        with pytest.raises(grpc.RpcError) as info:
            call(body, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = call(body, timeout=10, metadata=(("authorization", "Bearer s3cret"),))
        assert not ExportMetricsServiceResponse.FromString(reply).HasField("partial_success")


@pytest.mark.integration
def test_deeply_nested_json_and_grpc_gzip(service: EnricherService, downstream: Downstream) -> None:
    nested = '{"arrayValue": {"values": [' * 3000 + '{"intValue": 1}' + "]}}" * 3000  # valid, very deep
    deep = '{"resourceMetrics": [{"resource": {"attributes": [{"key": "k", "value": ' + nested + "}]}}]}"
    status, _, reply = post(service.ports["http"], deep.encode(), "application/json")
    assert status == 400 and b"RecursionError" in reply
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):  # what grpcio speaks
        with grpc.insecure_channel(f"127.0.0.1:{service.ports['grpc']}", compression=compression) as channel:
            call = channel.unary_unary(METRICS_METHOD)
            assert not ExportMetricsServiceResponse.FromString(
                call(good_request().SerializeToString(), timeout=10)
            ).HasField("partial_success")
            with pytest.raises(grpc.RpcError) as info:  # compresses to a few KiB, 2 MiB once inflated
                call(b"\x0a" + b"\x00" * (2 << 20), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, compression
    assert post(service.ports["http"], good_request().SerializeToString())[0] == 200
    assert len(drained(downstream, 3)) == 3
