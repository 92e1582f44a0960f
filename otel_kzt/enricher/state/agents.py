"""The agents' health on the enricher's /metrics: one series per node (label `k8s_node_name`), DESIGN §4.

Every export of an agent carries its own numbers as `kzt.agent.*` OTLP metrics (otel_kzt/agent/
telemetry.py) next to its flows; the core hands each resource that names a node to `observe`, which keeps
the last value of each. They pass through to the exporters untouched as well.

- The health series of a node are exposed while it reports (within `fresh_s`): after a failover to another
  replica, this one stops showing the old values within that time, so alerts that aggregate over replicas
  see the replica the agent writes to.
- `kzt_agent_last_report_timestamp_seconds` stays while the node exists in the metadata (else until
  `retention_s`): an agent that went silent keeps its alert (`KztAgentSilent`) firing, a node that left
  the cluster does not.
The number of nodes kept is capped (`max_agents`); what the cap refuses is counted, never silent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric as OtlpMetric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from otel_kzt import schema
from otel_kzt.k8s.model import MetadataIndex

log = logging.getLogger(__name__)

NODE_LABEL: Final = schema.prom_label(schema.RESOURCE_NODE_NAME)
FRESH_S: Final = 120.0
RETENTION_S: Final = 86_400.0
MAX_AGENTS: Final = 100_000

# OTLP metric (one point, no attributes) -> (Prometheus name, counter?, help)
_SCALARS: Final = {
    schema.OTLP_AGENT_FLOWS_TRACKED: (
        schema.AGENT_FLOWS_TRACKED,
        False,
        "flows in the agent's kernel flow maps",
    ),
    schema.OTLP_AGENT_MAP_FILL_RATIO: (
        schema.AGENT_MAP_FILL_RATIO,
        False,
        "flows / capacity of the agent's fuller flow map",
    ),
    schema.OTLP_AGENT_OVERFLOW_BYTES: (schema.AGENT_OVERFLOW_BYTES, True, "bytes of flows that did not fit"),
    schema.OTLP_AGENT_OVERFLOW_PACKETS: (
        schema.AGENT_OVERFLOW_PACKETS,
        True,
        "packets of flows that did not fit",
    ),
    schema.OTLP_AGENT_METADATA_SYNCED: (
        schema.AGENT_METADATA_SYNCED,
        False,
        "1 once the agent's metadata synced",
    ),
    schema.OTLP_AGENT_DATAPATH_COVERAGE: (
        schema.AGENT_DATAPATH_COVERAGE,
        False,
        "bytes counted / bytes on pod interfaces",
    ),
    schema.OTLP_AGENT_SERVICE_VIP_BYTES: (schema.AGENT_SERVICE_VIP_BYTES, True, "bytes sent to Service VIPs"),
    schema.OTLP_AGENT_DATAPATH_DEVICES: (schema.AGENT_DATAPATH_DEVICES, False, "network devices hooked (tc)"),
}
# OTLP Sum with one string attribute per point -> (Prometheus counter, that label, help)
_LABELLED: Final = {
    schema.OTLP_AGENT_DATAPATH_DEVICE_CHANGES: (
        schema.AGENT_DATAPATH_DEVICE_CHANGES,
        schema.AGENT_DEVICE_CHANGE_LABEL,
        "devices hooked or unhooked while running, or waiting for a restart (tc)",
    ),
}


# last report, values, exports, datapath, labelled counters ((OTLP name, label value) -> value)
_Copy = tuple[float, dict[str, float], dict[str, float], str | None, dict[tuple[str, str], float]]


@dataclass
class _Node:
    last_report: float
    values: dict[str, float] = field(default_factory=dict)  # OTLP name -> last value
    exports: dict[str, float] = field(default_factory=dict)  # result -> last cumulative count
    datapath: str | None = None
    labelled: dict[tuple[str, str], float] = field(default_factory=dict)  # `_LABELLED`'s, by label value


def _labelled_name(key: tuple[str, str]) -> str:
    """`name{label="value"}` of a `_LABELLED` counter's series, as the web view lists it."""
    prom, label, _ = _LABELLED[key[0]]
    return f'{prom}{{{label}="{key[1]}"}}'


def _add_labelled(
    families: dict[str, GaugeMetricFamily | CounterMetricFamily],
    node: str,
    labelled: dict[tuple[str, str], float],
) -> None:
    for (otlp_name, value), count in sorted(labelled.items()):
        prom, label, doc = _LABELLED[otlp_name]
        family = families.get(prom)
        if family is None:
            family = families[prom] = CounterMetricFamily(prom, doc, labels=[NODE_LABEL, label])
        family.add_metric([node, value], count)


def _value(metric: OtlpMetric) -> tuple[float, dict[str, str]] | None:
    """The metric's last point: (value, its string attributes); None for kinds the agent never sends."""
    kind = metric.WhichOneof("data")
    if kind not in ("gauge", "sum"):
        return None
    points = getattr(metric, kind).data_points
    if not points:
        return None
    point = points[-1]
    return _number(point), {kv.key: kv.value.string_value for kv in point.attributes}


def _number(point: Any) -> float:
    """A NumberDataPoint's value, double or int."""
    return float(point.as_double if point.WhichOneof("value") == "as_double" else point.as_int)


class AgentsHealth(Collector):
    def __init__(
        self,
        index: MetadataIndex | None = None,
        *,
        fresh_s: float = FRESH_S,
        retention_s: float = RETENTION_S,
        max_agents: int = MAX_AGENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._index, self._clock = index, clock
        self._fresh_s, self._retention_s, self._max = fresh_s, retention_s, max_agents
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self.refused = 0  # reports of nodes beyond max_agents

    def observe(self, node: str, metrics: Iterable[OtlpMetric], now: float) -> None:
        """Keep the `kzt.agent.*` values of one agent's resource, its `metrics` (the core's hook, per
        resource)."""
        with self._lock:
            state = self._nodes.get(node)
            if state is None:
                if len(self._nodes) >= self._max and not self._forget_one(now):
                    self.refused += 1
                    if self.refused % 1000 == 1:
                        log.warning(
                            "agents' health capped: max_agents=%d refused=%d", self._max, self.refused
                        )
                    return
                state = self._nodes[node] = _Node(now)
            state.last_report = now
            for metric in metrics:
                if metric.name.startswith("kzt.agent."):
                    self._keep(state, metric)

    @staticmethod
    def _keep(state: _Node, metric: OtlpMetric) -> None:
        got = _value(metric)
        if got is None:
            return
        value, attrs = got
        if metric.name in _SCALARS:
            state.values[metric.name] = value
        elif metric.name == schema.OTLP_AGENT_EXPORTS and metric.WhichOneof("data") == "sum":
            for point in metric.sum.data_points:
                result = next(
                    (kv.value.string_value for kv in point.attributes if kv.key == schema.AGENT_RESULT), ""
                )
                if result:
                    state.exports[result] = float(point.as_int)
        elif metric.name == schema.OTLP_AGENT_DATAPATH_INFO:
            state.datapath = attrs.get(schema.AGENT_DATAPATH_LABEL) or None
        elif metric.name in _LABELLED and metric.WhichOneof("data") == "sum":
            label = _LABELLED[metric.name][1]
            for point in metric.sum.data_points:
                key = next((kv.value.string_value for kv in point.attributes if kv.key == label), "")
                if key:
                    state.labelled[(metric.name, key)] = _number(point)

    def _forget_one(self, now: float) -> bool:
        """Room for a new node: drop the one silent longest, if it is beyond `fresh_s`."""
        oldest = min(self._nodes.items(), key=lambda item: item[1].last_report, default=None)
        if oldest is None or now - oldest[1].last_report <= self._fresh_s:
            return False
        del self._nodes[oldest[0]]
        return True

    def _sweep(self, now: float) -> dict[str, _Node]:
        """Forget nodes silent beyond the retention, or gone from the metadata and no longer fresh."""
        for name, state in list(self._nodes.items()):
            silent = now - state.last_report
            gone = self._index is not None and self._index.ready() and self._index.node(name) is None
            if silent > self._retention_s or (silent > self._fresh_s and gone):
                del self._nodes[name]
        return dict(self._nodes)

    def _copy(self, now: float) -> tuple[dict[str, _Copy], int]:
        with self._lock:
            nodes = {
                n: (s.last_report, dict(s.values), dict(s.exports), s.datapath, dict(s.labelled))
                for n, s in self._sweep(now).items()
            }
            return nodes, self.refused

    def health(self) -> list[dict[str, Any]]:
        """Per node, what `collect` exposes, by Prometheus name (the web view's agents panel: the same
        numbers as /metrics). A node not reporting within `fresh_s` keeps only its last report."""
        now = self._clock()
        nodes, _ = self._copy(now)
        out = []
        for name, (at, values, results, datapath, labelled) in sorted(nodes.items()):
            fresh = now - at <= self._fresh_s
            metrics = {_SCALARS[k][0]: v for k, v in sorted(values.items())}
            metrics.update({_labelled_name(k): v for k, v in sorted(labelled.items())})
            out.append({
                "node": name,
                "last_report": at,
                "reporting": fresh,
                "datapath": datapath if fresh else None,
                "metrics": metrics if fresh else {},
                "exports": dict(sorted(results.items())) if fresh else {},
            })  # fmt: skip
        return out

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        nodes, refused = self._copy(now)
        last = GaugeMetricFamily(
            schema.AGENT_LAST_REPORT, "when the agent last reported (Unix seconds)", labels=[NODE_LABEL]
        )
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        exports = CounterMetricFamily(
            schema.AGENT_EXPORTS,
            "the agent's export requests by result",
            labels=[NODE_LABEL, schema.AGENT_RESULT],
        )
        info = GaugeMetricFamily(
            schema.AGENT_DATAPATH_INFO,
            "the datapath mode counting on the node (value 1)",
            labels=[NODE_LABEL, schema.AGENT_DATAPATH_LABEL],
        )
        for name, (at, values, results, datapath, labelled) in sorted(nodes.items()):
            last.add_metric([name], at)
            if now - at > self._fresh_s:
                continue
            for otlp_name, value in values.items():
                prom, counter, doc = _SCALARS[otlp_name]
                family = families.get(prom)
                if family is None:
                    cls = CounterMetricFamily if counter else GaugeMetricFamily
                    family = families[prom] = cls(prom, doc, labels=[NODE_LABEL])
                family.add_metric([name], value)
            for result, count in sorted(results.items()):
                exports.add_metric([name, result], count)
            if datapath:
                info.add_metric([name, datapath], 1)
            _add_labelled(families, name, labelled)
        yield last
        yield from families.values()
        yield exports
        yield info
        yield CounterMetricFamily(
            schema.ENRICHER_AGENTS_REFUSED,
            "agents' health reports refused by the max_agents cap",
            value=refused,
        )
