"""Services and EndpointSlices as the enricher and the savings logic see them (DESIGN §7, seam 5).

A flow end (address, port, protocol) belongs to a Service when one of the Service's EndpointSlices lists
that address with that port: slices carry *target* ports (8080), never the Service port (80), and the
enricher sees the pod's address and listening port. Everything here is an immutable snapshot; the
`ServiceCatalog` answers from caches without blocking writers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from otel_kzt import schema


@dataclass(frozen=True, slots=True, order=True)
class ServiceRef:
    """A Service's identity; ordering by (namespace, name) is what "the first by name" means."""

    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str  # "" when the Service has a single unnamed port
    protocol: str  # "TCP", "UDP", "SCTP"
    port: int  # the Service port clients dial
    target_port: int | str  # a number, or the name of a container port
    node_port: int | None


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: str
    port: int | None  # None: the slice does not restrict ports (every port is the Service's)


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    """One endpoint of a slice. A dual-stack pod appears once per address family (one slice each)."""

    addresses: tuple[str, ...]  # canonical IP text
    address_type: str  # "IPv4" / "IPv6"
    ports: tuple[EndpointPort, ...]  # its slice's (target) ports
    zone: str | None  # the slice's `zone`, else its node's zone label; None when unknown
    node_name: str | None
    pod_namespace: str | None  # targetRef, when it is a Pod
    pod_name: str | None
    ready: bool  # conditions.ready (absent = true)
    serving: bool  # conditions.serving (absent = ready)
    terminating: bool  # conditions.terminating (absent = false)
    hint_zones: tuple[str, ...]  # hints.forZones: the zones kube-proxy sends here from; () = no hints

    @property
    def identity(self) -> str:
        """The same pod in the IPv4 and the IPv6 slice is one endpoint (counted once per zone)."""
        if self.pod_name is not None:
            return f"{self.pod_namespace}/{self.pod_name}"
        return ",".join(self.addresses)


@dataclass(frozen=True, slots=True)
class ServiceView:
    """A Service with its routing settings and the endpoints of all its slices."""

    ref: ServiceRef
    type: str  # ClusterIP, NodePort, LoadBalancer, ExternalName
    cluster_ips: tuple[str, ...]  # () for headless and ExternalName Services
    headless: bool  # spec.clusterIP None: kube-proxy does not route it, clients dial pods directly
    ports: tuple[ServicePort, ...]
    traffic_distribution: str | None  # spec.trafficDistribution as written (PreferSameZone, PreferClose…)
    topology_mode: str | None  # the topology-aware-routing annotation's value (newer key, else older)
    external_traffic_policy: str | None  # Cluster / Local (NodePort and LoadBalancer only)
    internal_traffic_policy: str | None
    endpoints: tuple[ServiceEndpoint, ...]
    changed_unix_s: float | None  # last observed change of routing or endpoint zones; None: none seen

    @property
    def routing(self) -> str:
        """The `traffic_distribution` label of `kzt_service_routing_info` (DESIGN §4).

        Headless first (no proxy routes it); the annotation wins over the field, as kube-proxy and the
        EndpointSlice controller decide.
        """
        if self.headless:
            return schema.ROUTING_HEADLESS
        if (self.topology_mode or "") in schema.TOPOLOGY_MODE_ENABLED:
            return schema.ROUTING_TOPOLOGY_AWARE
        return self.traffic_distribution or schema.ROUTING_NONE

    def endpoints_by_zone(self, condition: str = "ready") -> dict[str | None, int]:
        """Distinct endpoints per zone that are `ready`, `serving` or `terminating` (dual-stack: once)."""
        seen: dict[str, str | None] = {}
        for endpoint in self.endpoints:
            if getattr(endpoint, condition):
                seen.setdefault(endpoint.identity, endpoint.zone)
        return dict(Counter(seen.values()))

    def hints_by_zone(self) -> dict[str | None, frozenset[str]]:
        """Per endpoint zone, the client zones its ready endpoints are hinted for."""
        hints: dict[str | None, set[str]] = {}
        for endpoint in self.endpoints:
            if endpoint.ready and endpoint.hint_zones:
                hints.setdefault(endpoint.zone, set()).update(endpoint.hint_zones)
        return {zone: frozenset(names) for zone, names in hints.items()}

    @property
    def dual_stack(self) -> bool:
        return len({endpoint.address_type for endpoint in self.endpoints}) > 1


@dataclass(frozen=True, slots=True)
class ZoneRouting:
    """How to ask for same-zone routing on a cluster: a spec field value, or an annotation."""

    field: str  # "spec.trafficDistribution" or "metadata.annotations"
    key: str  # "trafficDistribution" or the annotation key
    value: str  # "PreferSameZone", "PreferClose", "Auto", "auto"


@dataclass(frozen=True, slots=True)
class ClusterVersion:
    """The API server's `/version` (managed clusters write minors like "30+")."""

    major: int
    minor: int
    git_version: str

    def zone_routing(self) -> ZoneRouting:
        """The newest same-zone setting this version accepts without feature gates.

        PreferSameZone: beta (on) 1.34; PreferClose: beta (on) 1.31, GA 1.33, deprecated alias since;
        the `topology-mode: Auto` annotation from 1.27; `topology-aware-hints: auto` before.
        """
        at = (self.major, self.minor)
        field = ("spec.trafficDistribution", "trafficDistribution")
        if at >= (1, 34):
            return ZoneRouting(*field, schema.ROUTING_PREFER_SAME_ZONE)
        if at >= (1, 31):
            return ZoneRouting(*field, schema.ROUTING_PREFER_CLOSE)
        if at >= (1, 27):
            return ZoneRouting("metadata.annotations", schema.ANNOTATION_TOPOLOGY_MODE, "Auto")
        return ZoneRouting("metadata.annotations", schema.ANNOTATION_TOPOLOGY_AWARE_HINTS, "auto")


class ServiceCatalog(Protocol):
    """What the enricher and `otel_kzt.savings` ask about Services (reached as `index.services`)."""

    def available(self) -> bool:
        """Services and EndpointSlices listed once and readable now. When False (not synced yet, or 403)
        every answer below is empty: Service attribution and savings are off, never guessed."""
        ...

    @property
    def generation(self) -> int:
        """Changes whenever an answer below may have changed (callers cache per value)."""
        ...

    def services_at(
        self, address: str, port: int, protocol: str, at_unix_s: float | None = None
    ) -> tuple[ServiceRef, ...]:
        """The Services whose slices list (address, target port, protocol) at `at_unix_s` (default now),
        sorted by (namespace, name): the first is the one a flow is attributed to. `protocol` as
        `network.transport` writes it (`tcp`) or as Kubernetes does (`TCP`). An endpoint that left its
        slice still answers for the index's grace period after it left (late points)."""
        ...

    def service_at(
        self, address: str, port: int, protocol: str, at_unix_s: float | None = None
    ) -> ServiceRef | None:
        """`services_at(...)[0]`, or None."""
        ...

    def service_of_vip(self, address: str) -> ServiceRef | None:
        """The Service one of whose cluster IPs `address` is (a VIP, before kube-proxy's DNAT), else None."""
        ...

    def services(self) -> tuple[ServiceView, ...]:
        """Every Service with its routing and endpoints, sorted by ref."""
        ...

    def service(self, ref: ServiceRef) -> ServiceView | None: ...

    def cluster_version(self) -> ClusterVersion | None:
        """The API server's version; None from a file source or before `/version` answered."""
        ...
