"""The rules of DESIGN §7: which change cuts a Service's (or a scraper's) billed traffic, and by how much.

Input: the Services as routed now and the billed flows of the last window. Output: recommendations, each
with its evidence, and a summary of every Service that carried billed traffic (with the reason when
nothing is recommended). Pure: the caller supplies the window's numbers and the setting the cluster
accepts.

- A flow is first offered to `zone-local-scrape`: a workload running in several zones whose every replica
  pulls from the nodes or DaemonSet pods (or Deployment pods reached without a Service) in every other
  zone. Its saving is all of that billed traffic, which sharding the scrape by zone keeps local.
- The rest of a Service's billed traffic splits by the client's zone. From zones where the Service has a
  ready endpoint it is what `prefer-same-zone` keeps local (kube-proxy then picks an endpoint of the
  client's zone); from zones without one it is what `spread-endpoints` would keep local: kube-proxy falls
  back to every endpoint for a zone no endpoint is hinted for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from otel_kzt.savings.model import (
    SECONDS_PER_MONTH,
    Direction,
    Evidence,
    Flow,
    Kind,
    Recommendation,
    ServiceKey,
    ServiceState,
    ServiceSummary,
    Workload,
)
from otel_kzt.savings.version import Setting
from otel_kzt.schema import WorkloadKind

HEADLESS_NOTE: Final = (
    "headless Service: clients connect to the pod addresses DNS gives them and kube-proxy routes none of "
    "it, so no routing setting helps; keep its clients in its endpoints' zones, or put a ClusterIP Service "
    "in front"
)
NO_ENDPOINTS_NOTE: Final = "no ready endpoints: nothing to route to until some are ready"
_SCRAPE_TARGETS: Final = frozenset({WorkloadKind.NODE.value, WorkloadKind.DAEMONSET.value})
_ALL_NODES: Final = Workload("", WorkloadKind.NODE.value, "")  # every node's address is one scrape target


def recommend(
    services: Mapping[ServiceKey, ServiceState],
    flows: Sequence[Flow],
    window_s: float,
    setting: Setting,
) -> tuple[list[Recommendation], list[ServiceSummary]]:
    """Recommendations (biggest saving first) and the Services with billed traffic (by name)."""
    scale = SECONDS_PER_MONTH / window_s if window_s > 0 else 0.0
    scrapes, rest = _scrapes(flows)
    recs = [_scrape_rec(client, target, group, scale) for (client, target), group in scrapes.items()]
    by_service: dict[ServiceKey, list[Flow]] = defaultdict(list)
    for flow in rest:
        if flow.service is not None:
            by_service[flow.service].append(flow)
    summaries = []
    for key in sorted(by_service):
        state = services.get(key)
        if state is None:
            continue  # the Service is gone: nothing left to change
        service_recs, note = _service_recs(state, by_service[key], scale, setting)
        recs += service_recs
        summaries.append(_summary(state, by_service[key], scale, note))
    recs.sort(key=lambda r: (-r.usd_per_month, r.kind.value, r.namespace, r.service, r.workload))
    return recs, summaries


def evidence(flows: Iterable[Flow]) -> tuple[Evidence, ...]:
    """Bytes and dollars by direction and zone pair, biggest first."""
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for f in flows:
        cell = sums[(f.direction.value, f.client_zone, f.server_zone)]
        cell[0] += f.bytes
        cell[1] += f.usd
    rows = [Evidence(Direction(d), c, s, b, u) for (d, c, s), (b, u) in sums.items()]
    rows.sort(key=lambda e: (-e.bytes, e.direction.value, e.client_zone, e.server_zone))
    return tuple(rows)


# --- zone-local-scrape ----------------------------------------------------------------------------------


def _target_group(flow: Flow) -> Workload | None:
    """The scrape target a flow's server belongs to, when its kind can be a scrape target."""
    server = flow.server
    if server.is_node:
        return _ALL_NODES
    if server.kind in _SCRAPE_TARGETS:
        return server
    if server.kind == WorkloadKind.DEPLOYMENT.value and flow.service is None:
        return server  # pulled by pod address: not through a Service that routing could fix
    return None


def _scrapes(flows: Sequence[Flow]) -> tuple[dict[tuple[Workload, Workload], list[Flow]], list[Flow]]:
    """Flows of clients that pull from every zone of a target group, and the flows left over."""
    candidates: dict[tuple[Workload, Workload], list[Flow]] = defaultdict(list)
    for flow in flows:
        group = _target_group(flow)
        if group is not None and not flow.client.is_node:
            candidates[(flow.client, group)].append(flow)
    found = {pair: group for pair, group in candidates.items() if _pulls_everywhere(group)}
    taken = {id(f) for group in found.values() for f in group}
    return found, [f for f in flows if id(f) not in taken]


def _pulls_everywhere(flows: Sequence[Flow]) -> bool:
    """A client in two or more zones, each zone's replicas reaching every other zone of the targets."""
    reached: dict[str, set[str]] = defaultdict(set)
    for f in flows:
        if f.client_zone and f.server_zone:
            reached[f.client_zone].add(f.server_zone)
    client_zones = set(reached)
    # Only billed traffic is seen, so targets in a client's own zone are taken to exist (nodes and
    # DaemonSet pods do run where the client runs): every replica must reach every other zone.
    zones = client_zones.union(*reached.values())
    if len(client_zones) < 2:
        return False
    return all(reached[z] >= zones - {z} for z in client_zones)


def _scrape_rec(client: Workload, target: Workload, flows: list[Flow], scale: float) -> Recommendation:
    what = "every node" if target == _ALL_NODES else f"every pod of {target.kind} {target}"
    zones = tuple(sorted({f.server_zone for f in flows} | {f.client_zone for f in flows}))
    return Recommendation(
        kind=Kind.ZONE_LOCAL_SCRAPE,
        namespace=client.namespace,
        service="",
        workload=client.name,
        action=(
            f"{client} runs in {len({f.client_zone for f in flows})} zones and each replica pulls from "
            f"{what} in every zone: shard it by zone, so that each replica pulls only from its own zone "
            "(e.g. keep the targets whose topology.kubernetes.io/zone is the replica's)"
        ),
        usd_per_month=sum(f.usd for f in flows) * scale,
        bytes_per_second=sum(f.bytes for f in flows) * scale / SECONDS_PER_MONTH,
        evidence=evidence(flows),
        zones=zones,
    )


# --- Service recommendations ----------------------------------------------------------------------------


def _service_recs(
    state: ServiceState, flows: list[Flow], scale: float, setting: Setting
) -> tuple[list[Recommendation], str]:
    """prefer-same-zone and spread-endpoints for one Service, and the note when neither applies."""
    if state.headless:
        return [], HEADLESS_NOTE
    zones = state.zones()
    if not zones:
        return [], NO_ENDPOINTS_NOTE
    local = [f for f in flows if f.client_zone in zones]
    missing = [f for f in flows if f.client_zone and f.client_zone not in zones]
    recs: list[Recommendation] = []
    notes: list[str] = []
    if local and state.prefers_zone:
        notes.append(
            f"already routed {state.routing}; billed traffic from zones with endpoints in the window "
            "(from before a change within it, or: endpoints overloaded, hints not set, clients not behind "
            "kube-proxy)"
        )
    elif local:
        recs.append(_prefer_same_zone(state, local, scale, setting))
    if missing:
        recs.append(_spread(state, missing, scale, setting))
    return recs, "; ".join(notes)


def _prefer_same_zone(
    state: ServiceState, flows: list[Flow], scale: float, setting: Setting
) -> Recommendation:
    return Recommendation(
        kind=Kind.PREFER_SAME_ZONE,
        namespace=state.namespace,
        service=state.name,
        workload="",
        action=f"set {setting.name} on Service {state.namespace}/{state.name}: "
        f"{setting.kubectl(state.namespace, state.name)}",
        usd_per_month=sum(f.usd for f in flows) * scale,
        bytes_per_second=sum(f.bytes for f in flows) * scale / SECONDS_PER_MONTH,
        evidence=evidence(flows),
        endpoints_by_zone=dict(state.endpoints_by_zone),
        zones=tuple(sorted({f.client_zone for f in flows})),
        setting=setting.name,
    )


def _spread(state: ServiceState, flows: list[Flow], scale: float, setting: Setting) -> Recommendation:
    missing = tuple(sorted({f.client_zone for f in flows}))
    then = ""
    if not state.prefers_zone:
        then = f", with {setting.name} set"
    return Recommendation(
        kind=Kind.SPREAD_ENDPOINTS,
        namespace=state.namespace,
        service=state.name,
        workload="",
        action=(
            f"run a ready endpoint of {state.namespace}/{state.name} in {', '.join(missing)}, where its "
            f"clients are and it has none (e.g. a topologySpreadConstraint on topology.kubernetes.io/zone)"
            f"{then}"
        ),
        usd_per_month=sum(f.usd for f in flows) * scale,
        bytes_per_second=sum(f.bytes for f in flows) * scale / SECONDS_PER_MONTH,
        evidence=evidence(flows),
        endpoints_by_zone=dict(state.endpoints_by_zone),
        zones=missing,
        setting="" if state.prefers_zone else setting.name,
    )


def _summary(state: ServiceState, flows: list[Flow], scale: float, note: str) -> ServiceSummary:
    return ServiceSummary(
        namespace=state.namespace,
        name=state.name,
        type=state.type,
        routing=state.routing,
        endpoints_by_zone=dict(state.endpoints_by_zone),
        bytes_per_second=sum(f.bytes for f in flows) * scale / SECONDS_PER_MONTH,
        usd_per_month=sum(f.usd for f in flows) * scale,
        note=note,
    )
