"""Typed inputs and outputs of the savings logic: Services as routed, billed flows over a window, advice.

Small frozen values, independent of where they come from (the enricher's metadata index and counters, or
a Prometheus holding them), so the rules in `recommend` can be tested on hand-made and fixture data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from otel_kzt import schema
from otel_kzt.k8s.servicemodel import ServiceView
from otel_kzt.schema import WorkloadKind

HOURS_PER_MONTH: Final = 730.0  # DESIGN §4: a month is 730 hours
SECONDS_PER_MONTH: Final = HOURS_PER_MONTH * 3600.0


PREFER_SAME_NODE: Final = "PreferSameNode"  # same node first, then the same zone: it keeps zones too
ZONE_PREFERRING: Final = frozenset(
    {
        schema.ROUTING_PREFER_SAME_ZONE,
        schema.ROUTING_PREFER_CLOSE,
        PREFER_SAME_NODE,
        schema.ROUTING_TOPOLOGY_AWARE,
    }
)


class Direction(StrEnum):
    """Which end of a flow the Service's endpoint is (DESIGN §4 `direction`)."""

    TO = "to"  # the destination is the endpoint: requests
    FROM = "from"  # the source is the endpoint: responses, usually most of the bytes


class Kind(StrEnum):
    """The three recommendations of DESIGN §7 (`kzt_savings_usd_per_month{recommendation}`)."""

    PREFER_SAME_ZONE = "prefer-same-zone"
    SPREAD_ENDPOINTS = "spread-endpoints"
    ZONE_LOCAL_SCRAPE = "zone-local-scrape"


ServiceKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class Workload:
    namespace: str
    kind: str
    name: str

    @property
    def is_node(self) -> bool:
        return self.kind == WorkloadKind.NODE.value

    def __str__(self) -> str:
        if self.is_node or not self.namespace:
            return f"node {self.name}" if self.name else "(outside the cluster)"
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServiceState:
    """A Service as the savings see it: its routing and where its ready endpoints are."""

    namespace: str
    name: str
    type: str  # ClusterIP, NodePort, LoadBalancer, ExternalName
    routing: str  # the `kzt_service_routing_info` label: schema.ROUTING_* or a trafficDistribution value
    endpoints_by_zone: Mapping[str, int]  # ready endpoints per zone ("" for endpoints without a zone)

    @classmethod
    def of(cls, view: ServiceView) -> ServiceState:
        ready = view.endpoints_by_zone("ready")  # dual-stack pods once; terminating ones are not ready
        return cls(
            view.ref.namespace,
            view.ref.name,
            view.type,
            view.routing,
            {zone or "": n for zone, n in sorted(ready.items(), key=lambda i: i[0] or "")},
        )

    @property
    def key(self) -> ServiceKey:
        return (self.namespace, self.name)

    @property
    def headless(self) -> bool:
        return self.routing == schema.ROUTING_HEADLESS

    @property
    def prefers_zone(self) -> bool:
        return self.routing in ZONE_PREFERRING

    def zones(self) -> frozenset[str]:
        """Zones holding at least one ready endpoint."""
        return frozenset(z for z, n in self.endpoints_by_zone.items() if z and n > 0)

    def signature(self) -> tuple[str, frozenset[str]]:
        """What a change is recorded for: the routing or the zones of its ready endpoints."""
        return (self.routing, self.zones())


@dataclass(frozen=True, slots=True)
class Flow:
    """Billed (cross-zone or cross-region) bytes between a client and a server over the window.

    `server` is the end whose port was recorded (the listening side); `service` the Service whose
    EndpointSlice lists that (address, port), when one does.
    """

    client: Workload
    client_zone: str
    server: Workload
    server_zone: str
    service: ServiceKey | None
    direction: Direction
    bytes: float
    usd: float


@dataclass(frozen=True, slots=True)
class Evidence:
    """Bytes and dollars over the window, by direction and zone pair (client zone -> server zone)."""

    direction: Direction
    client_zone: str
    server_zone: str
    bytes: float
    usd: float


@dataclass(frozen=True, slots=True)
class Recommendation:
    kind: Kind
    namespace: str
    service: str  # set for Service recommendations, "" for zone-local-scrape
    workload: str  # the scraping workload for zone-local-scrape, "" otherwise
    action: str  # what to change, in words a user can act on
    usd_per_month: float  # at the rate of the window, a month being 730 hours
    bytes_per_second: float  # the billed traffic the change keeps local
    evidence: tuple[Evidence, ...]
    endpoints_by_zone: Mapping[str, int] = field(default_factory=dict)
    zones: tuple[str, ...] = ()  # spread-endpoints: zones lacking an endpoint; scrape: zones scraped
    setting: str = ""  # prefer-same-zone: the routing setting recommended (one this cluster accepts)
    note: str = ""


@dataclass(frozen=True, slots=True)
class Period:
    """A Service's billed traffic over [start, end] (unix seconds)."""

    start: float
    end: float
    bytes: float
    usd: float

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def usd_per_month(self) -> float:
        return self.usd / self.seconds * SECONDS_PER_MONTH if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Change:
    """A recorded change of a Service's routing or endpoint zones, and its billed traffic around it."""

    at: float
    routing_before: str
    routing_after: str
    zones_before: tuple[str, ...]
    zones_after: tuple[str, ...]
    before: Period  # the window before the change
    after: Period  # from the change until now (at most one window)


@dataclass(frozen=True, slots=True)
class ServiceSummary:
    """One Service in the report: its routing, endpoints, billed traffic and the last change, if any."""

    namespace: str
    name: str
    type: str
    routing: str
    endpoints_by_zone: Mapping[str, int]
    bytes_per_second: float  # billed traffic over the window
    usd_per_month: float
    note: str = ""  # why nothing is recommended (headless ...)
    change: Change | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the report, the web view and `kzt_savings_usd_per_month` show, as of `generated_at`."""

    generated_at: float
    enabled: bool
    reason: str  # why the savings are off, when they are
    window_seconds: float  # --savings-window
    covered_seconds: float  # how much of it the enricher has seen (less just after start-up)
    kubernetes_version: str
    setting: str  # the routing setting this cluster accepts ("" when none)
    recommendations: tuple[Recommendation, ...] = ()
    services: tuple[ServiceSummary, ...] = ()

    @property
    def usd_per_month(self) -> float:
        return sum(r.usd_per_month for r in self.recommendations)


# The enricher's billed-flow counters are keyed in the order of schema.PROM_SAVINGS_FLOW_LABELS: client
# (namespace, kind, name, zone), server (the same), the server's Service (namespace, name), direction.
FlowKey = tuple[str, ...]


def flow_key(
    client: Workload,
    client_zone: str,
    server: Workload,
    server_zone: str,
    *,
    service: ServiceKey | None,
    direction: Direction,
) -> FlowKey:
    svc_ns, svc = service if service is not None else ("", "")
    return (
        client.namespace,
        client.kind,
        client.name,
        client_zone,
        server.namespace,
        server.kind,
        server.name,
        server_zone,
        svc_ns,
        svc,
        direction.value,
    )


def service_of(key: FlowKey) -> ServiceKey | None:
    return (key[8], key[9]) if key[9] else None


def flow_of(key: FlowKey, bytes_: float, usd: float) -> Flow:
    return Flow(
        Workload(key[0], key[1], key[2]),
        key[3],
        Workload(key[4], key[5], key[6]),
        key[7],
        service_of(key),
        Direction(key[10]),
        bytes_,
        usd,
    )
