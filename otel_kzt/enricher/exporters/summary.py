"""`/api/v1/summary`: the numbers the web view shows, from the same snapshot `/metrics` is built from.

Totals, never rates: the page divides the change between two polls by the time between them, exactly as a
Prometheus `rate()` over the counters would, so what the page says equals what `/metrics` says.
- `zones`: `kzt_zone_traffic_bytes_total` cell by cell;
- `talkers`: `kzt_flow_bytes_total{kzt_traffic_class="cross-zone"}` summed by workload pair (the labels
  `--flow-aggregation` keeps; a label it drops reads "");
- `classes`: `kzt_flow_bytes_total` summed by traffic class, `kzt_estimated_cost_usd_total` by class;
- `agents`: when each agent last reported (`kzt_enricher_agent_last_report_timestamp_seconds`) and, while
  it reports, its own health as `kzt_agent_*` shows it (datapath, flows tracked, map fill, overflow,
  exports by result, metadata synced: state/agents.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Final

from otel_kzt import schema

Snapshot = Mapping[str, Mapping[tuple[str, ...], float]]
DEFAULT_TOP: Final = 20
_PAIR: Final = (
    schema.SOURCE_NAMESPACE_NAME,
    schema.SOURCE_WORKLOAD_KIND,
    schema.SOURCE_WORKLOAD_NAME,
    schema.DESTINATION_NAMESPACE_NAME,
    schema.DESTINATION_WORKLOAD_KIND,
    schema.DESTINATION_WORKLOAD_NAME,
)
_PAIR_FIELDS: Final = (
    "source_namespace", "source_kind", "source_workload",
    "destination_namespace", "destination_kind", "destination_workload",
)  # fmt: skip


def summary(snap: Snapshot, flow_labels: Sequence[str], now: float, top: int = DEFAULT_TOP,
            health: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:  # fmt: skip
    """The body of `/api/v1/summary` (JSON-ready); `health`: `AgentsHealth.health()`."""
    return {
        "generated_at": now,
        "zones": [
            {"source_zone": src, "destination_zone": dst, "bytes": value}
            for (src, dst), value in sorted(snap.get("zone_bytes", {}).items())
        ],
        "talkers": _talkers(snap.get("flow_bytes", {}), flow_labels, top),
        "classes": _classes(snap, flow_labels),
        "agents": _agents(snap.get("agents", {}), health, now),
    }


def _agents(last: Mapping[tuple[str, ...], float], health: Sequence[Mapping[str, Any]],
            now: float) -> list[dict[str, Any]]:  # fmt: skip
    by_node = {h["node"]: h for h in health}
    reported = {key[0]: ts for key, ts in last.items()}
    out = []
    for node in sorted(set(reported) | set(by_node)):
        own = by_node.get(node, {})
        ts = reported.get(node, own.get("last_report", 0.0))
        out.append({
            "node": node, "last_report": ts, "age_seconds": max(0.0, now - ts),
            "reporting": bool(own.get("reporting", False)), "datapath": own.get("datapath"),
            "metrics": dict(own.get("metrics", {})), "exports": dict(own.get("exports", {})),
        })  # fmt: skip
    return out


def _talkers(flows: Mapping[tuple[str, ...], float], labels: Sequence[str], top: int) -> list[dict[str, Any]]:
    where = {attr: i for i, attr in enumerate(labels)}
    cls = where.get(schema.TRAFFIC_CLASS)
    if cls is None:
        return []
    picks = [where.get(attr) for attr in _PAIR]
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for key, value in flows.items():
        if key[cls] == schema.TrafficClass.CROSS_ZONE.value:
            sums[tuple(key[i] if i is not None else "" for i in picks)] += value
    ranked = sorted(((k, v) for k, v in sums.items() if v > 0), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{**dict(zip(_PAIR_FIELDS, key, strict=True)), "bytes": value} for key, value in ranked]


def _classes(snap: Snapshot, labels: Sequence[str]) -> list[dict[str, Any]]:
    cls = {attr: i for i, attr in enumerate(labels)}.get(schema.TRAFFIC_CLASS)
    nbytes: dict[str, float] = defaultdict(float)
    if cls is not None:
        for key, value in snap.get("flow_bytes", {}).items():
            nbytes[key[cls]] += value
    usd: dict[str, float] = defaultdict(float)
    for key, value in snap.get("cost", {}).items():
        usd[key[3]] += value  # (namespace, kind, workload, class): schema.PROM_ESTIMATED_COST_LABELS
    order = [c.value for c in schema.TrafficClass]
    present = sorted(set(nbytes) | set(usd), key=lambda c: order.index(c) if c in order else len(order))
    return [{"class": c, "bytes": nbytes.get(c, 0.0), "usd": usd.get(c, 0.0)} for c in present]
