"""Service attribution (DESIGN §3, §4): which Service each end of a flow is an endpoint of, and the keys its
bytes add to.

A flow's destination (address, port) listed by a Service's EndpointSlice makes it traffic *to* that
Service (requests); its source (address, port) listed makes it traffic *from* it (responses). The port is
the listening side's, which the agent records alone, so at most one end usually has one. Only the
destination's Service goes on the wire (`destination.k8s.service.*`); both count for
`kzt_service_traffic_bytes_total`, and billed (cross-zone, cross-region) flows feed the savings as
client -> server pairs (otel_kzt.savings.model.flow_key).

A destination that is a Service's cluster IP (what a socket addressed before kube-proxy's DNAT: the agent's
`cgroup` mode, DESIGN §3a) is traffic to that Service too; which zone its backend is in is not known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Protocol

from otel_kzt import schema
from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.k8s.servicemodel import ServiceCatalog, ServiceRef
from otel_kzt.savings.model import Direction, FlowKey, Workload, flow_key
from otel_kzt.schema import TrafficClass

Refs = tuple[ServiceRef | None, ServiceRef | None]  # (the destination's Service, the source's)
NO_SERVICES: Final[Refs] = (None, None)
BILLED_CROSSING: Final = frozenset({TrafficClass.CROSS_ZONE, TrafficClass.CROSS_REGION})
# Kept in a series' slim naming: what `ServiceAttribution.ends` needs again on a recheck.
KEYS_FOR_RECHECK: Final = (schema.SOURCE_PORT, schema.DESTINATION_PORT, schema.NETWORK_TRANSPORT)


_MAX_CACHED: Final = 100_000  # (address, port, transport) answers kept per catalog generation


class ServiceAttribution:
    """Looks both ends of a flow up in the index's `ServiceCatalog` (seam 5); off while it is unavailable.

    Many series share an endpoint (every client of one pod): answers are cached per (address, port,
    transport) and catalog generation, so a series seen for the first time usually costs two dict lookups.
    The time of the point is not part of the key: an endpoint that left its slice keeps its Service until
    the catalog changes again (the index's grace period covers late points the same way).
    """

    def __init__(self, catalog: ServiceCatalog | None) -> None:
        self._catalog = catalog
        self._cache: dict[tuple[str, str, str], ServiceRef | None] = {}
        self._cap = Cap("services.answers", _MAX_CACHED)
        self.caps = (self._cap,)  # on /metrics
        self._generation = -1

    def ends(self, attrs: Mapping[str, str], ready: bool, at_unix_s: float | None = None) -> Refs:
        catalog = self._catalog
        if not ready or catalog is None or not catalog.available():
            return NO_SERVICES
        if catalog.generation != self._generation:
            self._cache, self._generation = {}, catalog.generation
        transport = attrs.get(schema.NETWORK_TRANSPORT, "")
        destination = attrs.get(schema.DESTINATION_ADDRESS)
        return (
            self._at(catalog, destination, attrs.get(schema.DESTINATION_PORT), transport, at_unix_s)
            or self.vip(destination or ""),
            self._at(catalog, attrs.get(schema.SOURCE_ADDRESS), attrs.get(schema.SOURCE_PORT), transport,
                     at_unix_s),
        )  # fmt: skip

    def vip(self, address: str) -> ServiceRef | None:
        """The Service whose cluster IP `address` is, None when it is none or Services are off."""
        catalog = self._catalog
        if catalog is None or not address:
            return None
        return catalog.service_of_vip(address)

    def _at(self, catalog: ServiceCatalog, address: str | None, port: str | None, transport: str,
            at: float | None) -> ServiceRef | None:  # fmt: skip
        if not address or not port:
            return None
        key = (address, port, transport)
        try:
            return self._cache[key]
        except KeyError:
            found = catalog.service_at(address, int(port), transport, at) if port.isdigit() else None
            self._cap.room(self._cache)
            self._cache[key] = found
            return found


def wire_attrs(refs: Refs) -> list[tuple[str, str]]:
    """`destination.k8s.service.name/namespace` for the destination's Service."""
    dst = refs[0]
    if dst is None:
        return []
    return [
        (schema.DESTINATION_SERVICE_NAME, dst.name),
        (schema.DESTINATION_SERVICE_NAMESPACE, dst.namespace),
    ]


_WORKLOAD_KEYS: Final = {
    end: (schema.end_attr(end, schema.NAMESPACE_NAME), schema.end_attr(end, schema.WORKLOAD_KIND),
          schema.end_attr(end, schema.WORKLOAD_NAME))
    for end in (schema.SOURCE, schema.DESTINATION)
}  # fmt: skip


def _end(attrs: Mapping[str, str], end: str) -> Workload:
    ns, kind, name = _WORKLOAD_KEYS[end]
    get = attrs.get
    return Workload(get(ns, ""), get(kind, ""), get(name, ""))


def service_keys(attrs: Mapping[str, str], cls: TrafficClass, refs: Refs) -> list[tuple[str, ...]]:
    """Label values (schema.PROM_SERVICE_TRAFFIC_LABELS) of `kzt_service_traffic_bytes_total` it adds to."""
    out: list[tuple[str, ...]] = []
    ends = ((refs[0], Direction.TO, schema.SOURCE), (refs[1], Direction.FROM, schema.DESTINATION))
    for ref, direction, peer in ends:
        if ref is not None:
            p = _end(attrs, peer)
            out.append((ref.namespace, ref.name, direction.value, p.namespace, p.kind, p.name, cls.value))
    return out


def billed_flow_key(attrs: Mapping[str, str], cls: TrafficClass, refs: Refs) -> FlowKey | None:
    """The savings' client -> server key of a billed flow, None for free flows or ones without a port."""
    if cls not in BILLED_CROSSING:
        return None
    src_zone, dst_zone = attrs.get(schema.SOURCE_ZONE, ""), attrs.get(schema.DESTINATION_ZONE, "")
    if not src_zone or not dst_zone:
        return None
    if attrs.get(schema.DESTINATION_PORT):  # the destination listens: a request to it
        return flow_key(
            _end(attrs, schema.SOURCE),
            src_zone,
            _end(attrs, schema.DESTINATION),
            dst_zone,
            service=_key(refs[0]),
            direction=Direction.TO,
        )
    if attrs.get(schema.SOURCE_PORT):  # the source listens: its response
        return flow_key(
            _end(attrs, schema.DESTINATION),
            dst_zone,
            _end(attrs, schema.SOURCE),
            src_zone,
            service=_key(refs[1]),
            direction=Direction.FROM,
        )
    return None  # no listening side (ICMP): neither end is a server


def _key(ref: ServiceRef | None) -> tuple[str, str] | None:
    return (ref.namespace, ref.name) if ref is not None else None


Totals = dict[tuple[str, ...], float]


class Families(Protocol):
    """The aggregates these flows add to (exporters.prometheus.Aggregates)."""

    service_bytes: Totals
    savings_bytes: Totals
    savings_usd: Totals

    def intern(self, key: tuple[str, ...]) -> tuple[str, ...]: ...


def service_targets(
    families: Families, attrs: Mapping[str, str], cls: TrafficClass, refs: Refs, usd_per_byte: float
) -> list[tuple[Totals, tuple[str, ...], float]]:
    """Where a byte series' increments go besides the DESIGN §4 families: its Services' counters and, for
    a billed flow, the savings' bytes and dollars. Most series are neither (the first test)."""
    if refs[0] is None and refs[1] is None and cls not in BILLED_CROSSING:
        return []
    out = [(families.service_bytes, families.intern(k), 1.0) for k in service_keys(attrs, cls, refs)]
    key = billed_flow_key(attrs, cls, refs)
    if key is not None:
        key = families.intern(key)
        out += [(families.savings_bytes, key, 1.0), (families.savings_usd, key, usd_per_byte)]
    return out
