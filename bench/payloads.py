"""The benchmark cluster and the agents' requests, shared by the in-process (bench/enricher.py) and the
real-process (bench/enricher_cluster.py) enricher benchmarks, so both measure the same cluster and flows.

Node n is in ZONES[n % 3] and runs `pods_per_node` pods; agent n sends flows from its own pods to pods
spread over the whole cluster, as DESIGN §3 describes an agent's points.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE

from otel_kzt import schema
from tests.support.k8s_objects import make_node, make_pod

ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
# The flows' start: later than any enricher's start-up, so they count from their first point (a run that
# began before the enricher started is a baseline, DESIGN §4: it would count only from its second point).
RUN_START_NS = 4_000_000_000 * 10**9


def cluster_objects(
    agents: int, pods_per_node: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[list[str]]]:
    """(nodes, pods, ips) as the API server holds them: `agents` nodes over three zones, each with
    `pods_per_node` pods; ips[n] are node n's pod IPs."""
    nodes, pods, ips = [], [], []
    for n in range(agents):
        name = f"node-{n}"
        nodes.append(make_node(name, [f"192.168.{n // 250}.{n % 250 + 1}"], zone=ZONES[n % 3]))
        node_ips = [f"10.{n // 250}.{n % 250}.{p + 1}" for p in range(pods_per_node)]
        ips.append(node_ips)
        for p, ip in enumerate(node_ips):
            pods.append(make_pod(f"app-{n}-{p}", name, [ip], owner=("ReplicaSet", f"app{p % 7}-5d8f")))
    return nodes, pods, ips


def build_payloads(
    ips: list[list[str]], series: int, intervals: int, at_ns: int | None = None
) -> list[list[bytes]]:
    """payloads[interval][agent]: one request per agent, bytes and packets for `series` flows, measured
    at `interval + 1` seconds (or all at `at_ns`)."""
    out = []
    flat = [ip for node in ips for ip in node]
    for interval in range(intervals):
        row = []
        for a, local in enumerate(ips):
            req = ExportMetricsServiceRequest()
            rm = req.resource_metrics.add()
            for key, value in (
                (schema.SERVICE_NAME, schema.AGENT_SERVICE_NAME),
                (schema.RESOURCE_NODE_NAME, f"node-{a}"),
            ):
                rm.resource.attributes.add(key=key).value.string_value = value
            sm = rm.scope_metrics.add()
            for metric, scale in ((schema.FLOW_BYTES, 1500), (schema.FLOW_PACKETS, 1)):
                m = sm.metrics.add(name=metric)
                m.sum.is_monotonic = True
                m.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
                for s in range(series):
                    dp = m.sum.data_points.add(
                        start_time_unix_nano=RUN_START_NS, time_unix_nano=at_ns or 10**9 * (interval + 1)
                    )
                    dp.as_int = (s + 1) * scale * (interval + 1)
                    p = s % len(local)
                    src, dst = local[p], flat[(a * 7919 + s * 104729) % len(flat)]
                    # what an agent sends (DESIGN §3): addresses, transport, port, and its local source pod
                    for key, value in (
                        (schema.SOURCE_ADDRESS, src),
                        (schema.DESTINATION_ADDRESS, dst),
                        (schema.NETWORK_TYPE, "ipv4"),
                        (schema.NETWORK_TRANSPORT, "tcp"),
                        (schema.DESTINATION_PORT, str(8000 + s % 50)),
                        (schema.SOURCE_POD_NAME, f"app-{a}-{p}"),
                        (schema.SOURCE_NAMESPACE_NAME, "shop"),
                        (schema.SOURCE_POD_UID, f"5b0c8a2e-7f1d-4c3b-9e6a-{a:06d}{p:06d}"),
                    ):
                        dp.attributes.add(key=key).value.string_value = value
            row.append(req.SerializeToString())
        out.append(row)
    return out
