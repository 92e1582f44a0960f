"""Every metric, attribute and label name otel-kzt puts on the wire or on /metrics, defined once.

The wire contract (DESIGN.md §3) between agent and enricher, and the Prometheus names of §4. Anything that
writes or reads one of these names imports it from here; no other module spells them out.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

# --- Metrics on the wire (agent -> enricher) -----------------------------------------------------------

FLOW_BYTES: Final = "kzt.flow.bytes"
FLOW_BYTES_UNIT: Final = "By"
FLOW_BYTES_DESCRIPTION: Final = "IP bytes (IPv4 total length; IPv6 payload length + 40) that left the source"
FLOW_PACKETS: Final = "kzt.flow.packets"
FLOW_PACKETS_UNIT: Final = "{packet}"
FLOW_PACKETS_DESCRIPTION: Final = "IP packets that left the source"
FLOW_METRICS: Final = frozenset({FLOW_BYTES, FLOW_PACKETS})

# --- Data-point attributes ------------------------------------------------------------------------------

SOURCE_ADDRESS: Final = "source.address"
DESTINATION_ADDRESS: Final = "destination.address"
SOURCE_PORT: Final = "source.port"
DESTINATION_PORT: Final = "destination.port"
NETWORK_TYPE: Final = "network.type"
NETWORK_TRANSPORT: Final = "network.transport"
TRAFFIC_CLASS: Final = "kzt.traffic.class"

SOURCE: Final = "source"
DESTINATION: Final = "destination"

# Per-end attributes: the same suffix under `source.` and `destination.`.
POD_NAME: Final = "k8s.pod.name"
NAMESPACE_NAME: Final = "k8s.namespace.name"
POD_UID: Final = "k8s.pod.uid"
NODE_NAME: Final = "k8s.node.name"
WORKLOAD_KIND: Final = "k8s.workload.kind"
WORKLOAD_NAME: Final = "k8s.workload.name"
AVAILABILITY_ZONE: Final = "cloud.availability_zone"
REGION: Final = "cloud.region"

END_SUFFIXES: Final = (
    POD_NAME,
    NAMESPACE_NAME,
    POD_UID,
    NODE_NAME,
    WORKLOAD_KIND,
    WORKLOAD_NAME,
    AVAILABILITY_ZONE,
    REGION,
)


def end_attr(end: str, suffix: str) -> str:
    """`end_attr("source", POD_NAME)` -> `source.k8s.pod.name`."""
    return f"{end}.{suffix}"


SOURCE_POD_NAME: Final = end_attr(SOURCE, POD_NAME)
SOURCE_NAMESPACE_NAME: Final = end_attr(SOURCE, NAMESPACE_NAME)
SOURCE_POD_UID: Final = end_attr(SOURCE, POD_UID)
SOURCE_NODE_NAME: Final = end_attr(SOURCE, NODE_NAME)
SOURCE_WORKLOAD_KIND: Final = end_attr(SOURCE, WORKLOAD_KIND)
SOURCE_WORKLOAD_NAME: Final = end_attr(SOURCE, WORKLOAD_NAME)
SOURCE_ZONE: Final = end_attr(SOURCE, AVAILABILITY_ZONE)
SOURCE_REGION: Final = end_attr(SOURCE, REGION)
DESTINATION_POD_NAME: Final = end_attr(DESTINATION, POD_NAME)
DESTINATION_NAMESPACE_NAME: Final = end_attr(DESTINATION, NAMESPACE_NAME)
DESTINATION_POD_UID: Final = end_attr(DESTINATION, POD_UID)
DESTINATION_NODE_NAME: Final = end_attr(DESTINATION, NODE_NAME)
DESTINATION_WORKLOAD_KIND: Final = end_attr(DESTINATION, WORKLOAD_KIND)
DESTINATION_WORKLOAD_NAME: Final = end_attr(DESTINATION, WORKLOAD_NAME)
DESTINATION_ZONE: Final = end_attr(DESTINATION, AVAILABILITY_ZONE)
DESTINATION_REGION: Final = end_attr(DESTINATION, REGION)
# The Service whose EndpointSlice lists the destination (address, port) (DESIGN §3; enricher only).
DESTINATION_SERVICE_NAME: Final = "destination.k8s.service.name"
DESTINATION_SERVICE_NAMESPACE: Final = "destination.k8s.service.namespace"


class NetworkType(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"


# IANA protocol numbers with a semantic-convention name; any other protocol is written as its number.
TRANSPORT_NAMES: Final[dict[int, str]] = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp", 132: "sctp"}


def transport_name(proto: int) -> str:
    return TRANSPORT_NAMES.get(proto, str(proto))


class TrafficClass(StrEnum):
    SAME_NODE = "same-node"
    SAME_ZONE = "same-zone"
    CROSS_ZONE = "cross-zone"
    CROSS_REGION = "cross-region"
    EXTERNAL = "external"
    UNKNOWN = "unknown"


# Classes that cloud providers bill: flow logs and cost cover these.
BILLED_CLASSES: Final = frozenset({TrafficClass.CROSS_ZONE, TrafficClass.CROSS_REGION, TrafficClass.EXTERNAL})


class WorkloadKind(StrEnum):
    DEPLOYMENT = "Deployment"
    STATEFULSET = "StatefulSet"
    DAEMONSET = "DaemonSet"
    JOB = "Job"
    CRONJOB = "CronJob"
    REPLICASET = "ReplicaSet"
    POD = "Pod"
    NODE = "Node"


# --- Kubernetes labels read from Nodes and Pods ---------------------------------------------------------

LABEL_ZONE: Final = "topology.kubernetes.io/zone"
LABEL_REGION: Final = "topology.kubernetes.io/region"
LABEL_ZONE_LEGACY: Final = "failure-domain.beta.kubernetes.io/zone"
LABEL_REGION_LEGACY: Final = "failure-domain.beta.kubernetes.io/region"
LABEL_POD_TEMPLATE_HASH: Final = "pod-template-hash"

# --- Services and EndpointSlices (DESIGN §7) ---------------------------------------------------------------

LABEL_SERVICE_NAME: Final = "kubernetes.io/service-name"  # on an EndpointSlice: the Service it serves
ANNOTATION_TOPOLOGY_MODE: Final = "service.kubernetes.io/topology-mode"  # topology-aware routing, 1.27+
ANNOTATION_TOPOLOGY_AWARE_HINTS: Final = "service.kubernetes.io/topology-aware-hints"  # its name before 1.27
TOPOLOGY_MODE_ENABLED: Final = frozenset({"Auto", "auto"})  # the values the EndpointSlice controller honours
# `traffic_distribution` label values of kzt_service_routing_info (a spec.trafficDistribution value written
# as it is otherwise, e.g. PreferSameNode).
ROUTING_NONE: Final = "none"
ROUTING_PREFER_SAME_ZONE: Final = "PreferSameZone"
ROUTING_PREFER_CLOSE: Final = "PreferClose"
ROUTING_TOPOLOGY_AWARE: Final = "topology-aware"
ROUTING_HEADLESS: Final = "headless"

# --- Resource attributes --------------------------------------------------------------------------------

SERVICE_NAME: Final = "service.name"
SERVICE_VERSION: Final = "service.version"
HOST_NAME: Final = "host.name"
RESOURCE_NODE_NAME: Final = "k8s.node.name"
CLUSTER_NAME: Final = "k8s.cluster.name"
AGENT_SERVICE_NAME: Final = "otel-kzt-agent"
ENRICHER_SERVICE_NAME: Final = "otel-kzt-enricher"

# --- Prometheus exposition of the enricher (DESIGN §4) --------------------------------------------------


def prom_label(attribute: str) -> str:
    """OpenTelemetry -> Prometheus label name translation (dots and other invalid characters -> `_`)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in attribute)


# kubezonnet-compatible: same name and labels, so its dashboards and queries keep working.
PROM_POD_CROSS_ZONE_BYTES: Final = "pod_cross_zone_network_traffic_bytes"  # `_total` added by the client
PROM_POD_CROSS_ZONE_LABELS: Final = ("namespace", "pod")
PROM_FLOW_BYTES: Final = "kzt_flow_bytes"
PROM_FLOW_PACKETS: Final = "kzt_flow_packets"
PROM_ZONE_TRAFFIC_BYTES: Final = "kzt_zone_traffic_bytes"
PROM_ZONE_TRAFFIC_LABELS: Final = (prom_label(SOURCE_ZONE), prom_label(DESTINATION_ZONE))
PROM_ESTIMATED_COST: Final = "kzt_estimated_cost_usd"
PROM_ESTIMATED_COST_LABELS: Final = (
    prom_label(SOURCE_NAMESPACE_NAME),
    prom_label(SOURCE_WORKLOAD_KIND),
    prom_label(SOURCE_WORKLOAD_NAME),
    prom_label(TRAFFIC_CLASS),
)

# Default aggregation of kzt_flow_* on /metrics: workload pair + zones + traffic class.
DEFAULT_FLOW_AGGREGATION: Final = (
    SOURCE_NAMESPACE_NAME,
    SOURCE_WORKLOAD_KIND,
    SOURCE_WORKLOAD_NAME,
    SOURCE_ZONE,
    DESTINATION_NAMESPACE_NAME,
    DESTINATION_WORKLOAD_KIND,
    DESTINATION_WORKLOAD_NAME,
    DESTINATION_ZONE,
    TRAFFIC_CLASS,
)

# Services and savings (DESIGN §4, §7). Direction values: `to` (the destination is the Service's endpoint:
# requests) and `from` (the source is: responses).
PROM_SERVICE_TRAFFIC_BYTES: Final = "kzt_service_traffic_bytes"  # `_total` added by the client
PROM_SERVICE_TRAFFIC_LABELS: Final = (
    "service_namespace",
    "service",
    "direction",
    "peer_k8s_namespace_name",
    "peer_k8s_workload_kind",
    "peer_k8s_workload_name",
    prom_label(TRAFFIC_CLASS),
)
PROM_SERVICE_ENDPOINTS: Final = "kzt_service_endpoints"  # gauge: ready endpoints per zone
PROM_SERVICE_ENDPOINTS_LABELS: Final = ("service_namespace", "service", "zone")
PROM_SERVICE_ROUTING_INFO: Final = "kzt_service_routing_info"  # gauge, value 1
PROM_SERVICE_ROUTING_INFO_LABELS: Final = ("service_namespace", "service", "traffic_distribution")
PROM_SERVICE_ROUTING_CHANGE: Final = "kzt_service_routing_change_timestamp_seconds"
PROM_SERVICE_LABELS: Final = ("service_namespace", "service")
PROM_SAVINGS_USD_PER_MONTH: Final = "kzt_savings_usd_per_month"
PROM_SAVINGS_LABELS: Final = ("namespace", "service", "workload", "recommendation")
PROM_SAVINGS_ENABLED: Final = "kzt_savings_enabled"  # 0 while Services/EndpointSlices cannot be read
PROM_SAVINGS_INFO: Final = "kzt_savings_info"  # value 1: the cluster's version and the setting it accepts
PROM_SAVINGS_INFO_LABELS: Final = ("kubernetes_version", "setting")
# The billed (cross-zone, cross-region) flows the savings are computed from, client -> server, so that
# `otel-kzt report --prometheus` runs the same rules over Prometheus' increases.
PROM_SAVINGS_FLOW_BYTES: Final = "kzt_savings_flow_bytes"
PROM_SAVINGS_FLOW_COST: Final = "kzt_savings_flow_cost_usd"
PROM_SAVINGS_FLOW_LABELS: Final = (
    "client_k8s_namespace_name",
    "client_k8s_workload_kind",
    "client_k8s_workload_name",
    "client_cloud_availability_zone",
    "server_k8s_namespace_name",
    "server_k8s_workload_kind",
    "server_k8s_workload_name",
    "server_cloud_availability_zone",
    "service_namespace",
    "service",
    "direction",
)

# --- Flow logs -------------------------------------------------------------------------------------------

FLOW_LOG_EVENT_NAME: Final = "kzt.flow"
FLOW_LOG_BYTES: Final = "kzt.flow.bytes"
FLOW_LOG_PACKETS: Final = "kzt.flow.packets"
FLOW_LOG_COST: Final = "kzt.estimated_cost_usd"
FLOW_LOG_INTERVAL_START: Final = "kzt.interval.start"
FLOW_LOG_INTERVAL_END: Final = "kzt.interval.end"

# --- Own telemetry (agent and enricher health) ----------------------------------------------------------

AGENT_FLOWS_TRACKED: Final = "kzt_agent_flows_tracked"
AGENT_MAP_FILL_RATIO: Final = "kzt_agent_flow_map_fill_ratio"
AGENT_OVERFLOW_BYTES: Final = "kzt_agent_overflow_bytes"
AGENT_OVERFLOW_PACKETS: Final = "kzt_agent_overflow_packets"
AGENT_EXPORTS: Final = "kzt_agent_exports"  # label `result`: ok / failed
AGENT_EXPORT_DURATION: Final = "kzt_agent_export_duration_seconds"
AGENT_METADATA_SYNCED: Final = "kzt_agent_metadata_synced"
AGENT_DATAPATH_INFO: Final = "kzt_agent_datapath_info"  # gauge 1, label `datapath`: the mode counting
AGENT_DATAPATH_LABEL: Final = "datapath"
AGENT_DATAPATH_COVERAGE: Final = "kzt_agent_datapath_coverage_ratio"  # counted / pod interface bytes (§3a)
AGENT_SERVICE_VIP_BYTES: Final = "kzt_agent_service_vip_bytes"  # counter (cgroup mode): bytes to Service VIPs
AGENT_DATAPATH_DEVICES: Final = "kzt_agent_datapath_devices"  # gauge (tc mode): devices hooked now
# counter (tc mode), label `change`: devices hooked / unhooked while running, or left to the uplinks
AGENT_DATAPATH_DEVICE_CHANGES: Final = "kzt_agent_datapath_device_changes"
AGENT_DEVICE_CHANGE_LABEL: Final = "change"
DEVICE_CHANGES: Final = ("added", "removed", "covered")  # every one exported, at 0 until it happens
# The enricher only: when each node's agent last reported, kept while the node exists (KztAgentSilent).
AGENT_LAST_REPORT: Final = "kzt_agent_last_report_timestamp_seconds"

# The same agent health as OTLP metrics (OpenTelemetry style), sent in the agent's own export requests so
# any OTLP backend, and the enricher (which passes unknown metrics through), sees them.
OTLP_AGENT_FLOWS_TRACKED: Final = "kzt.agent.flows.tracked"  # gauge {flow}: flows in the kernel map
OTLP_AGENT_FLOWS_EXPORTED: Final = "kzt.agent.flows.exported"  # gauge {flow}: local flows in this export
OTLP_AGENT_FLOWS_EVICTED: Final = "kzt.agent.flows.evicted"  # sum {flow}: idle flows evicted
# sum {flow}: evicted flows whose final value was given up undelivered (the bounded retry store was full)
OTLP_AGENT_FINALS_DROPPED: Final = "kzt.agent.flows.finals_dropped"
# gauge {flow}: evicted flows whose final value awaits delivery (retried every interval)
OTLP_AGENT_FINALS_PENDING: Final = "kzt.agent.flows.finals_pending"
OTLP_AGENT_MAP_FILL_RATIO: Final = "kzt.agent.flow_map.fill_ratio"  # gauge 1
OTLP_AGENT_OVERFLOW_BYTES: Final = "kzt.agent.overflow.bytes"  # sum By
OTLP_AGENT_OVERFLOW_PACKETS: Final = "kzt.agent.overflow.packets"  # sum {packet}
OTLP_AGENT_EXPORTS: Final = "kzt.agent.exports"  # sum {request}, attribute `result`
OTLP_AGENT_EXPORT_DURATION: Final = "kzt.agent.export.duration"  # gauge s: the last interval's export
OTLP_AGENT_METADATA_SYNCED: Final = "kzt.agent.metadata.synced"  # gauge 0/1
OTLP_AGENT_DATAPATH_INFO: Final = "kzt.agent.datapath.info"  # gauge 1, attribute `datapath`
OTLP_AGENT_DATAPATH_COVERAGE: Final = "kzt.agent.datapath.coverage_ratio"  # gauge 0..1 (where measured)
OTLP_AGENT_SERVICE_VIP_BYTES: Final = "kzt.agent.service_vip.bytes"  # sum By (cgroup mode)
OTLP_AGENT_DATAPATH_DEVICES: Final = "kzt.agent.datapath.devices"  # gauge {device} (tc mode)
OTLP_AGENT_DATAPATH_DEVICE_CHANGES: Final = "kzt.agent.datapath.device_changes"  # sum {device}, `change`
AGENT_RESULT: Final = "result"  # attribute of kzt.agent.exports: `ok` / `failed`

ENRICHER_RECEIVED_POINTS: Final = "kzt_enricher_received_data_points"
ENRICHER_REJECTED_POINTS: Final = "kzt_enricher_rejected_data_points"
ENRICHER_EXPORT_FAILURES: Final = "kzt_enricher_export_failures"
ENRICHER_EXPORT_DROPPED: Final = "kzt_enricher_export_dropped_items"
ENRICHER_METADATA_SYNCED: Final = "kzt_enricher_metadata_synced"
ENRICHER_SERIES_DROPPED: Final = "kzt_enricher_series_dropped"
ENRICHER_SERIES_ACTIVE: Final = "kzt_enricher_series_active"
# label k8s_node_name: when each agent last reported (the "agents not reporting" alert)
ENRICHER_AGENT_LAST_REPORT: Final = "kzt_enricher_agent_last_report_timestamp_seconds"
ENRICHER_AGENT_LAST_REPORT_LABEL: Final = prom_label(RESOURCE_NODE_NAME)
ENRICHER_AGENTS_REFUSED: Final = "kzt_enricher_agents_refused"  # counter: agents beyond the health cap
ENRICHER_EXPORTER_LABEL: Final = "exporter"
# --state-file: failed checkpoint loads (corrupt, unknown version) and writes, by `stage`; last good write
ENRICHER_CHECKPOINT_ERRORS: Final = "kzt_enricher_checkpoint_errors"
ENRICHER_CHECKPOINT_STAGE_LABEL: Final = "stage"
CHECKPOINT_STAGES: Final = ("load", "write")  # exported at 0 from the start, with or without --state-file
ENRICHER_CHECKPOINT_TIMESTAMP: Final = "kzt_enricher_checkpoint_timestamp_seconds"
# The receivers' caps (DESIGN §5.9): what each refused, and what is held now.
ENRICHER_RECEIVER_REFUSED: Final = "kzt_enricher_receiver_refused"  # counter: _total on /metrics
ENRICHER_RECEIVER_ERRORS: Final = "kzt_enricher_receiver_errors"  # counter: requests failed by a bug of ours
ENRICHER_RECEIVER_INFLIGHT_BYTES: Final = "kzt_enricher_receiver_inflight_bytes"
ENRICHER_RECEIVER_CONNECTIONS: Final = "kzt_enricher_receiver_connections"
ENRICHER_RECEIVER_LABEL: Final = "receiver"
ENRICHER_RECEIVER_REASON_LABEL: Final = "reason"
ENRICHER_REFUSED_INFLIGHT_BYTES: Final = "max_inflight_bytes"
ENRICHER_REFUSED_CONNECTIONS: Final = "max_connections"
ENRICHER_REFUSED_CONCURRENT_CALLS: Final = "max_concurrent_calls"
ENRICHER_REFUSED_EXPORT_QUEUE: Final = "export_queue_full"  # back-pressure from a slow exporter
# The counting rule (DESIGN §4): points it declines, by `reason` (one of the NOT_COUNTED_* values)
ENRICHER_NOT_COUNTED: Final = "kzt_enricher_points_not_counted"
ENRICHER_NOT_COUNTED_REASON_LABEL: Final = "reason"
NOT_COUNTED_DUPLICATE: Final = "duplicate"  # the same run, value and time as a point already counted
NOT_COUNTED_STALE: Final = "stale"  # older or smaller than the run's last counted point
NOT_COUNTED_BASELINE: Final = "baseline"  # a run this enricher could not have seen from its start
NOT_COUNTED_LATE_RUN: Final = "late_run"  # a run no longer kept (beyond the lateness bound or the run cap)
NOT_COUNTED_REJECTED: Final = "rejected"  # a bad point (NaN, negative, no addresses, wrong kind)
NOT_COUNTED_REASONS: Final = (
    NOT_COUNTED_DUPLICATE,
    NOT_COUNTED_STALE,
    NOT_COUNTED_BASELINE,
    NOT_COUNTED_LATE_RUN,
    NOT_COUNTED_REJECTED,
)
# Counting state given up to a cap, by `state`: `run` (runs per series), `tombstone` (forgotten series)
ENRICHER_COUNTING_EVICTED: Final = "kzt_enricher_counting_state_evicted"
ENRICHER_COUNTING_STATE_LABEL: Final = "state"
# The caches emptied on reaching their cap (processing/bounded.py, DESIGN §5.6), by `cache` (the Cap's name)
ENRICHER_CACHE_RESETS: Final = "kzt_enricher_cache_resets"
ENRICHER_CACHE_LABEL: Final = "cache"
# How the flow metrics were read (processing/encoded.py, repeats.py), by `read`: a request from its bytes
# alone (`bytes`, a steady agent's) or decoded whole (`decoded`); a flow Sum checked whole against its
# group's last shape (`layout`) or walked point by point (`points`). A sender whose steady requests are
# always `decoded` costs the enricher the slow path every interval.
ENRICHER_METRIC_REQUESTS: Final = "kzt_enricher_metric_requests"
ENRICHER_FLOW_SUMS: Final = "kzt_enricher_flow_sums"
ENRICHER_READ_LABEL: Final = "read"
READ_BYTES: Final = "bytes"
READ_DECODED: Final = "decoded"
READ_LAYOUT: Final = "layout"
READ_POINTS: Final = "points"

# --- Everything on the enricher's /metrics -------------------------------------------------------------
# The one list of what a scrape can show (counters without the `_total` the client adds), with the default
# flow aggregation's labels. deploy/'s alert rules and dashboard are checked against it, and a test checks
# a running enricher's /metrics against it both ways, so neither can fall behind the code.

ENRICHER_PROM_COUNTERS: Final = frozenset(
    {
        PROM_POD_CROSS_ZONE_BYTES,
        PROM_FLOW_BYTES,
        PROM_FLOW_PACKETS,
        PROM_ZONE_TRAFFIC_BYTES,
        PROM_ESTIMATED_COST,
        PROM_SERVICE_TRAFFIC_BYTES,  # Services and savings (exporters/savings.py)
        PROM_SAVINGS_FLOW_BYTES,
        PROM_SAVINGS_FLOW_COST,
        ENRICHER_RECEIVED_POINTS,  # the enricher's own health (exporters/prometheus.py HealthMetrics)
        ENRICHER_REJECTED_POINTS,
        ENRICHER_EXPORT_FAILURES,
        ENRICHER_EXPORT_DROPPED,
        ENRICHER_SERIES_DROPPED,
        ENRICHER_CHECKPOINT_ERRORS,
        ENRICHER_NOT_COUNTED,
        ENRICHER_COUNTING_EVICTED,
        ENRICHER_METRIC_REQUESTS,
        ENRICHER_FLOW_SUMS,
        ENRICHER_CACHE_RESETS,  # exporters/caches.py
        ENRICHER_RECEIVER_REFUSED,  # receivers/caps.py
        ENRICHER_RECEIVER_ERRORS,  # receivers/caps.py
        ENRICHER_AGENTS_REFUSED,  # the agents' health (state/agents.py), label k8s_node_name
        AGENT_OVERFLOW_BYTES,
        AGENT_OVERFLOW_PACKETS,
        AGENT_EXPORTS,
        AGENT_SERVICE_VIP_BYTES,
        AGENT_DATAPATH_DEVICE_CHANGES,
    }
)
ENRICHER_PROM_GAUGES: Final = frozenset(
    {
        ENRICHER_METADATA_SYNCED,
        ENRICHER_SERIES_ACTIVE,
        ENRICHER_CHECKPOINT_TIMESTAMP,
        ENRICHER_AGENT_LAST_REPORT,
        ENRICHER_RECEIVER_INFLIGHT_BYTES,
        ENRICHER_RECEIVER_CONNECTIONS,
        AGENT_LAST_REPORT,
        AGENT_FLOWS_TRACKED,
        AGENT_MAP_FILL_RATIO,
        AGENT_METADATA_SYNCED,
        AGENT_DATAPATH_INFO,
        AGENT_DATAPATH_COVERAGE,
        AGENT_DATAPATH_DEVICES,
        PROM_SERVICE_ENDPOINTS,
        PROM_SERVICE_ROUTING_INFO,
        PROM_SERVICE_ROUTING_CHANGE,
        PROM_SAVINGS_USD_PER_MONTH,
        PROM_SAVINGS_ENABLED,
        PROM_SAVINGS_INFO,
    }
)
ENRICHER_PROM_LABELS: Final = frozenset(
    {
        *(prom_label(a) for a in DEFAULT_FLOW_AGGREGATION),
        *PROM_POD_CROSS_ZONE_LABELS,
        *PROM_ZONE_TRAFFIC_LABELS,
        *PROM_ESTIMATED_COST_LABELS,
        *PROM_SERVICE_TRAFFIC_LABELS,
        *PROM_SERVICE_ENDPOINTS_LABELS,
        *PROM_SERVICE_ROUTING_INFO_LABELS,
        *PROM_SERVICE_LABELS,
        *PROM_SAVINGS_LABELS,
        *PROM_SAVINGS_INFO_LABELS,
        *PROM_SAVINGS_FLOW_LABELS,
        ENRICHER_AGENT_LAST_REPORT_LABEL,
        ENRICHER_EXPORTER_LABEL,
        ENRICHER_CHECKPOINT_STAGE_LABEL,
        ENRICHER_RECEIVER_LABEL,
        ENRICHER_RECEIVER_REASON_LABEL,
        ENRICHER_NOT_COUNTED_REASON_LABEL,
        ENRICHER_COUNTING_STATE_LABEL,
        ENRICHER_CACHE_LABEL,
        ENRICHER_READ_LABEL,
        AGENT_RESULT,
        AGENT_DATAPATH_LABEL,
        AGENT_DEVICE_CHANGE_LABEL,
    }
)
