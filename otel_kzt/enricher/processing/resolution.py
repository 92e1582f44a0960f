"""Attribute resolution: both ends of a flow -> pod, namespace, node, workload, zone, region, traffic class.

Pure logic over the MetadataIndex seam. The core calls `Resolver.resolve` once per series and metadata
generation and caches the answer, so nothing here needs to be fast per data point; what it returns is
shaped so the per-point path can reuse it cheaply (the added attributes pre-serialised as protobuf).

Who sent it (DESIGN §3): a source the agent names by its node (`source.k8s.node.name` without a pod: what
the node's own stack sent, whatever local address it carries, and the NodePort hop its NAT made) is that
node, never external. A link-local end (169.254.0.0/16, fe80::/10: NodeLocal DNS, the cloud's metadata
service) is on the sender's node: same-node, never external.

IP reuse: an address is named by who owned it when the point was measured (`at_unix_s`), not when it
arrived. An index with `lookup_window` (ClusterIndex) also says over which times its answer holds; a
`Resolved` carries the intersection of both ends' windows, so the core re-resolves a series only for a
point measured outside it. An index without `lookup_window` is taken as time-independent per generation.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from otel_kzt import schema
from otel_kzt.enricher.processing import native
from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.enricher.processing.pieces import KEY, VALUE, Pieces, joined, pieces
from otel_kzt.enricher.processing.services import (
    KEYS_FOR_RECHECK,
    NO_SERVICES,
    Refs,
    ServiceAttribution,
    wire_attrs,
)
from otel_kzt.k8s.model import Endpoint, MetadataIndex, NodeInfo
from otel_kzt.schema import TrafficClass, WorkloadKind

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAX_CACHED_ENDS: Final = 200_000  # addresses remembered per metadata generation (then start afresh)


@dataclass(slots=True)  # never changed once made; not frozen: a frozen init costs ~1 us more (2 a new flow)
class Resolved:
    """What one series resolves to while the metadata generation is unchanged."""

    extra: bytes  # the attributes the enricher adds, serialised as NumberDataPoint.attributes
    attrs: Mapping[str, str]  # every attribute after enrichment (aggregation labels, flow logs)
    traffic_class: TrafficClass
    provider: str | None  # cloud provider of the source node (price table choice)
    basis: tuple[object, ...] = ()  # what the answer was derived from (see Resolver.recheck)
    valid_from: float = -math.inf  # measurement times (unix s) [valid_from, valid_until) it holds for
    valid_until: float = math.inf
    services: Refs = NO_SERVICES  # the Services whose endpoints the destination and the source are
    source_node: str = ""  # the node the sender named the source by (`given_node`): re-checked as that

    def slim(self) -> Resolved:
        """What a cached series keeps: `attrs` cut to the addresses, ports and transport (what recheck needs).
        The full map served the aggregation labels and flow-log template, built once before this. In C
        when built (_native_new.c `slim`: a copy of these slots, attrs cut the same way), else `slim_py`."""
        if _SLIM is not None:
            made: Resolved | None = _SLIM(self, _ATTRS_SLOT, _SLIM_KEYS)
            if made is not None:
                return made
        return self.slim_py()

    def slim_py(self) -> Resolved:
        """`slim` in Python: the statement."""
        attrs = self.attrs
        keep = {k: attrs[k] for k in _SLIM_KEYS if k in attrs}
        return Resolved(  # by keyword, not dataclasses.replace (a field-by-field copy per new series)
            extra=self.extra,
            attrs=keep,
            traffic_class=self.traffic_class,
            provider=self.provider,
            basis=self.basis,
            valid_from=self.valid_from,
            valid_until=self.valid_until,
            services=self.services,
            source_node=self.source_node,
        )


class _End:
    """One address's answer, cached per metadata generation; the attributes it gives a flow's source or
    destination are encoded the first time it is that end (one per cached address and role, not per
    series: each pod serves several series at cluster scale)."""

    __slots__ = ("_as_destination", "_as_source", "endpoint", "node", "valid_from", "valid_until")

    def __init__(
        self,
        endpoint: Endpoint | None,
        node: NodeInfo | None,
        valid_from: float = -math.inf,  # the index's answer holds for measurement times in [from, until)
        valid_until: float = math.inf,
    ) -> None:
        self.endpoint, self.node, self.valid_from, self.valid_until = endpoint, node, valid_from, valid_until
        self._as_source: tuple[Pieces, ...] | None = None
        self._as_destination: tuple[Pieces, ...] | None = None

    def as_source(self) -> tuple[Pieces, ...]:
        """The attributes this answer gives a flow's source, encoded (made once)."""
        if self._as_source is None:
            self._as_source = tuple(pieces(_end_attrs(schema.SOURCE, self)))
        return self._as_source

    def as_destination(self) -> tuple[Pieces, ...]:
        """The attributes this answer gives a flow's destination, encoded (made once)."""
        if self._as_destination is None:
            self._as_destination = tuple(pieces(_end_attrs(schema.DESTINATION, self)))
        return self._as_destination


_UNKNOWN_END: Final = _End(None, None)
_CLASS_PIECES: Final = {cls: pieces([(schema.TRAFFIC_CLASS, cls.value)])[0] for cls in TrafficClass}
_SLIM_KEYS: Final = (schema.SOURCE_ADDRESS, schema.DESTINATION_ADDRESS, *KEYS_FOR_RECHECK)
# The C steps of a new flow (_native_new.c), None on the Python path: Resolver._ends_of's common case, its
# classes in the order it takes them, and Resolved.slim (with where Resolved keeps attrs)
_ENDS = None if native.MODULE is None else native.MODULE.ends
_CLASSES: Final = (TrafficClass.SAME_NODE, TrafficClass.SAME_ZONE, TrafficClass.CROSS_ZONE,
                   TrafficClass.CROSS_REGION, TrafficClass.UNKNOWN)  # fmt: skip
_SLIM = None if native.MODULE is None else native.MODULE.slim
_ATTRS_SLOT: Final = -1 if native.MODULE is None else native.MODULE.slots_of(Resolved, ("attrs",))[0]

# ClusterIndex.lookup_window: an answer and the times [from, until) it holds for (not in the seam's Protocol,
# so indexes without history, like test fakes, keep working).
_LookupWindow = Callable[[str, float | None], tuple[Endpoint | None, float, float]]


class Resolver:
    def __init__(self, index: MetadataIndex, cluster_cidrs: Sequence[str] = ()) -> None:
        self._index = index
        self._cidrs: tuple[Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cluster_cidrs)
        # address -> end, for one metadata generation: many series share an address (a busy service)
        self._ends: dict[str, _End] = {}
        self._ends_cap = Cap("resolution.ends", _MAX_CACHED_ENDS)
        self._ends_generation = -1
        self._lookup_window: _LookupWindow | None = getattr(index, "lookup_window", None)
        self._native_ends = _ENDS  # the tests set it to None to run the Python way on the same input
        self._services = ServiceAttribution(getattr(index, "services", None))
        self.caps = (self._ends_cap, *self._services.caps)  # on /metrics

    def resolve(self, given: Mapping[str, str], ready: bool, at_unix_s: float | None = None) -> Resolved:
        """Enrich one series' attributes as measured at `at_unix_s` (None: now); `ready` False (metadata
        not synced) marks it unknown."""
        return self.resolve_encoded(given, ready, at_unix_s)[0]

    def resolve_encoded(
        self, given: Mapping[str, str], ready: bool, at_unix_s: float | None = None
    ) -> tuple[Resolved, list[Pieces]]:
        """`resolve`, and the pieces of the attributes it adds, in the order `attrs` holds them after the
        given ones (a flow-log template is made of them, pieces.py)."""
        source_node = given_node(given)
        cls, src, dst = self._ends_of(given, ready, at_unix_s, source_node)
        refs = self._services.ends(given, ready, at_unix_s)
        services = (
            [] if refs is NO_SERVICES else pieces([(k, v) for k, v in wire_attrs(refs) if k not in given])
        )
        computed = (src.as_source(), dst.as_destination(), (_CLASS_PIECES[cls],))
        encoded, attrs, extra = joined(given, computed, services)
        provider = src.node.provider if src.node is not None else None
        basis = (ready, src.endpoint, src.node, dst.endpoint, dst.node, refs)
        lo = src.valid_from if src.valid_from > dst.valid_from else dst.valid_from  # the windows' overlap
        hi = src.valid_until if src.valid_until < dst.valid_until else dst.valid_until
        return Resolved(extra, attrs, cls, provider, basis, lo, hi, refs, source_node), encoded

    def added(self, given: Mapping[str, str], ready: bool) -> list[tuple[str, str]]:
        """The attributes `resolve` adds, as pairs (the benchmark's naive loop uses these)."""
        return [(KEY(p), VALUE(p)) for p in self._added(given, ready, None, given_node(given))[0]]

    def _added(
        self, given: Mapping[str, str], ready: bool, at: float | None, source_node: str
    ) -> tuple[list[Pieces], TrafficClass, _End, _End]:
        """The encoded attributes both ends and the class add (those `given` lacks), the class and ends;
        `source_node`: given_node(given)."""
        cls, src, dst = self._ends_of(given, ready, at, source_node)
        computed = (*src.as_source(), *dst.as_destination(), _CLASS_PIECES[cls])
        return [p for p in computed if KEY(p) not in given], cls, src, dst

    def _ends_of(
        self, given: Mapping[str, str], ready: bool, at: float | None, source_node: str
    ) -> tuple[TrafficClass, _End, _End]:
        """A flow's class and ends; `source_node`: given_node(given). The common case in C when built
        (_native_new.c `ends`: both ends cached for this generation and holding `at`, each a pod or node, the
        source not named by its node), the rest here."""
        src_addr = given.get(schema.SOURCE_ADDRESS, "")
        dst_addr = given.get(schema.DESTINATION_ADDRESS, "")
        common = self._native_ends
        if (
            common is not None
            and ready
            and not source_node
            and at is not None
            and self._index.generation == self._ends_generation
        ):
            found: tuple[TrafficClass, _End, _End] | None = common(
                self._ends, src_addr, dst_addr, at, _CLASSES
            )
            if found is not None:
                return found
        src = self._by_node(source_node, self._end(src_addr, at)) if ready else _UNKNOWN_END
        dst = self._end(dst_addr, at) if ready else _UNKNOWN_END
        cls = self.classify(src, dst, src_addr, dst_addr) if ready else TrafficClass.UNKNOWN
        return cls, src, dst

    def recheck(self, resolved: Resolved, ready: bool, at_unix_s: float | None = None) -> Resolved | None:
        """After a metadata change, or for a point measured outside `resolved`'s window: the same answer
        with its window renewed when both ends still resolve to what they did, else None. Much cheaper
        than `resolve` (no encoding), and in a large cluster the generation moves with every pod change."""
        src, dst = _UNKNOWN_END, _UNKNOWN_END
        if ready:
            src = self._end(resolved.attrs.get(schema.SOURCE_ADDRESS, ""), at_unix_s)
            src = self._by_node(resolved.source_node, src)
            dst = self._end(resolved.attrs.get(schema.DESTINATION_ADDRESS, ""), at_unix_s)
        refs = self._services.ends(resolved.attrs, ready, at_unix_s)
        if resolved.basis != (ready, src.endpoint, src.node, dst.endpoint, dst.node, refs):
            return None
        lo = src.valid_from if src.valid_from > dst.valid_from else dst.valid_from  # the windows' overlap
        hi = src.valid_until if src.valid_until < dst.valid_until else dst.valid_until
        if lo == resolved.valid_from and hi == resolved.valid_until:
            return resolved
        return dataclasses.replace(resolved, valid_from=lo, valid_until=hi)

    def still_valid(self, resolved: Resolved, ready: bool, at_unix_s: float | None = None) -> bool:
        return self.recheck(resolved, ready, at_unix_s) is not None

    def _end(self, address: str, at: float | None) -> _End:
        generation = self._index.generation
        if generation != self._ends_generation:
            self._ends, self._ends_generation = {}, generation
        end = self._ends.get(address)
        # A cached answer serves every time in its window (one per address: most never change owner).
        if end is not None and (end.valid_from <= at < end.valid_until if at is not None else _timeless(end)):
            return end
        if not address:
            endpoint, lo, hi = None, -math.inf, math.inf
        elif self._lookup_window is not None:
            endpoint, lo, hi = self._lookup_window(address, at)
        else:
            endpoint, lo, hi = self._index.lookup(address, at), -math.inf, math.inf
        node = None
        if endpoint is not None and endpoint.node_name:
            node = self._index.node(endpoint.node_name)
        self._ends_cap.room(self._ends)
        end = self._ends[address] = _End(endpoint, node, lo, hi)
        return end

    def _by_node(self, name: str, found: _End) -> _End:
        """The source as the sender named it: by its node when it says so, whatever the address."""
        if not name:
            return found
        if found.endpoint is not None and found.endpoint.is_node and found.endpoint.node_name == name:
            return found
        node = Endpoint(name, WorkloadKind.NODE, name)
        return _End(node, self._index.node(name), found.valid_from, found.valid_until)

    def classify(self, src: _End, dst: _End, src_addr: str, dst_addr: str) -> TrafficClass:
        source, destination = src.endpoint, dst.endpoint
        if source is None or destination is None:
            return self._classify_outside(src, dst, src_addr, dst_addr)
        if source.node_name and source.node_name == destination.node_name:
            return TrafficClass.SAME_NODE
        return _crossing(src.node, dst.node)

    def _classify_outside(self, src: _End, dst: _End, src_addr: str, dst_addr: str) -> TrafficClass:
        """`classify` of a flow with an end that is neither pod nor node."""
        for end, address in ((src, src_addr), (dst, dst_addr)):
            if end.endpoint is None and _link_local(address):
                return TrafficClass.SAME_NODE  # only ever the sender's own node
        for end, address in ((src, src_addr), (dst, dst_addr)):
            if end.endpoint is None:
                # Neither pod nor node: outside the cluster, unless the address is a Service's cluster IP
                # (its backend's zone is not known where the socket addressed the VIP) or in a cluster
                # range (a pod we have not seen yet): then we do not know.
                inside = self._services.vip(address) is not None or self._in_cluster(address)
                return TrafficClass.UNKNOWN if inside else TrafficClass.EXTERNAL
        raise AssertionError("classify: both ends known")

    def _in_cluster(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._cidrs)


def given_node(given: Mapping[str, str]) -> str:
    """The node a sender named the source by (`source.k8s.node.name` without a pod), else ""."""
    if given.get(schema.SOURCE_POD_NAME):
        return ""
    return given.get(schema.SOURCE_NODE_NAME, "")


def _crossing(src: NodeInfo | None, dst: NodeInfo | None) -> TrafficClass:
    """The class of a flow between two known ends on different nodes: by their nodes' zones and regions."""
    if src is None or dst is None or src.zone is None or dst.zone is None:
        return TrafficClass.UNKNOWN
    if src.region and dst.region and src.region != dst.region:
        return TrafficClass.CROSS_REGION
    if src.zone != dst.zone:
        return TrafficClass.CROSS_ZONE
    return TrafficClass.SAME_ZONE


def _link_local(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_link_local
    except ValueError:
        return False


def _timeless(end: _End) -> bool:
    """A cached answer serves a time-less query ("now") only when it holds at every time."""
    return end.valid_from == -math.inf and end.valid_until == math.inf


# Each end's attribute names, made once: pod, namespace, uid, node, workload kind and name, zone, region
_END_KEYS: Final = {
    end: tuple(
        schema.end_attr(end, suffix)
        for suffix in (
            schema.POD_NAME, schema.NAMESPACE_NAME, schema.POD_UID, schema.NODE_NAME,
            schema.WORKLOAD_KIND, schema.WORKLOAD_NAME, schema.AVAILABILITY_ZONE, schema.REGION,
        )
    )
    for end in (schema.SOURCE, schema.DESTINATION)
}  # fmt: skip


def _end_attrs(end: str, info: _End) -> list[tuple[str, str]]:
    ep = info.endpoint
    if ep is None:
        return []
    pod, namespace, uid, node_key, kind, name, zone, region = _END_KEYS[end]
    out: list[tuple[str, str]] = []
    if not ep.is_node:
        out += [(pod, ep.pod_name or ""), (namespace, ep.namespace or ""), (uid, ep.pod_uid or "")]
    if ep.node_name:
        out.append((node_key, ep.node_name))
    out += [(kind, ep.workload_kind.value), (name, ep.workload_name)]
    node = info.node
    if node is not None:
        if node.zone:
            out.append((zone, node.zone))
        if node.region:
            out.append((region, node.region))
    # Empty values (a pod without a uid in a file fixture) say nothing: leave them out.
    return [(k, v) for k, v in out if v]
