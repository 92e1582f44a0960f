"""Which flows of the kernel map are this node's to export, and what they are called.

A packet is counted once in the cluster: at its source node (DESIGN §5.2), and its source is decided by its
path (DESIGN §3). The map holds every flow the hook saw, including forwarded and arriving traffic; the key
carries how the packet came there when the mode can tell (`FlowKey.origin`):

- sent by the node's own stack (`ORIGIN_LOCAL`): the node's, whatever local address it carries (NodeLocal
  DNS 169.254.20.10, the kube-dns ClusterIP it answers from, a tunnel or cilium_host address);
- routed through, rewritten both ways by this node's NAT (`ORIGIN_SNAT`: the NodePort / LoadBalancer hop
  with externalTrafficPolicy Cluster): the node's;
- routed through with a source someone other than the sender wrote (`ORIGIN_REWRITTEN`: IPVS un-NATs a
  reply to its VIP, one of this node's addresses): never ours, the backend's node counted it;
- otherwise (routed through with the sender's source, or a mode that cannot tell: `tc`, `cgroup`), by
  address: a pod running on this node (not hostNetwork: those carry the node's address), from the
  metadata index, or one of this node's own addresses (the Node object's addresses, plus the addresses
  of the interfaces of the agent's network namespace, so node traffic is exported before metadata has
  synced).

A node's flow carries `source.k8s.node.name`, so the enricher names it by the node whatever its address.
Overlay encapsulation sent by the node (UDP to a VXLAN/Geneve port) is not exported: its inner packets are.
Traffic to a loopback address never leaves the node and is not exported either.

Renames (DESIGN §5.7): when a flow's names change under the agent (a pod replaced by another with the same
address while the kernel key survives, a local destination appearing or leaving), the flow keeps its old
names for one more export, its last value, and is then evicted from the kernel map (`renamed()`): the next
packets begin a new flow, a new run, under the new names. Nothing is counted twice under the new name, and
the new run's start survives agent restarts (the kernel keeps it).

The attributes of a flow only change when the metadata generation or the node addresses change, so they
are serialized once per flow (`encode.PointHead`) and cached; the cache holds only keys of the last
snapshot, so it is bounded by the flow map size.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
from collections.abc import Callable, Collection
from typing import Final

from otel_kzt import schema
from otel_kzt.agent.encode import AttrValue, PointHead, attributes, point_head
from otel_kzt.agent.flows import (
    AF_INET,
    ORIGIN_LOCAL,
    ORIGIN_REWRITTEN,
    ORIGIN_SNAT,
    FlowCounters,
    FlowKey,
)
from otel_kzt.agent.shared import Shared
from otel_kzt.k8s.model import Endpoint, MetadataIndex

log = logging.getLogger(__name__)

UDP = 17
# The datapath derives first-seen wall-clock times from kernel boot-time stamps with an offset read anew
# for every snapshot, so the same flow's start wobbles by microseconds between reads and between agent
# processes. A start time that changes means a reset to every OTLP consumer (the enricher would count the
# whole value again), so starts are made stable: whole seconds (two processes agree unless the wobble
# straddles a second boundary: ~1e-6 per flow and restart), and within a process the first start is kept
# while the reported one stays this close (a re-created flow's start differs by at least the idle timeout).
_SECOND_NS = 1_000_000_000
_SAME_START_NS = 2 * _SECOND_NS


def stable_start(first_seen_unix_ns: int) -> int:
    return first_seen_unix_ns - first_seen_unix_ns % _SECOND_NS


_MISSING: Final[PointHead] = PointHead(-1, b"", b"")  # cache sentinel, distinct from None (not ours)
DEFAULT_OVERLAY_PORTS = (4789, 8472, 6081)  # VXLAN (IANA, Linux/flannel), Geneve


def address_text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def namespace_addresses() -> frozenset[str]:
    """Addresses of every interface of this network namespace (`ip -j addr`), as text."""
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], check=True, capture_output=True, text=True, timeout=5
        ).stdout
        interfaces = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("cannot list interface addresses: error=%s", exc)
        return frozenset()
    return frozenset(
        str(ipaddress.ip_address(a["local"]))
        for iface in interfaces
        for a in iface.get("addr_info", ())
        if "local" in a
    )


class LocalFlows:
    """Decides per flow key whether it is exported and caches its serialized point head."""

    def __init__(
        self,
        node_name: str,
        index: MetadataIndex | None,
        overlay_ports: Collection[int] = DEFAULT_OVERLAY_PORTS,
        interface_addresses: Callable[[], frozenset[str]] = namespace_addresses,
    ) -> None:
        self._node = node_name
        self._index = index
        self._overlay_ports = frozenset(overlay_ports)
        self._interface_addresses = interface_addresses
        self._cache: dict[FlowKey, PointHead | None] = {}  # None: not ours
        # Serialized pieces: per attribute value, and per end and raw address the pod attributes (b"": none).
        self._pieces: dict[tuple[str, AttrValue], bytes] = {}
        self._shared = Shared()  # start times and prefixes the cached heads share
        self._pods: dict[str, dict[bytes, bytes]] = {schema.SOURCE: {}, schema.DESTINATION: {}}
        self._node_raw: frozenset[bytes] = frozenset()
        self._generation: int | None = None
        self._revalidate = False
        self._node_addresses: frozenset[str] | None = None
        self._node_attrs = attributes(7, ((schema.SOURCE_NODE_NAME, node_name),))
        # Exported flows whose names changed: they keep their old head until evicted (`renamed()`).
        self._renamed: set[FlowKey] = set()

    def refresh(self) -> None:
        """Re-read node addresses and the metadata generation, once per interval before `heads()`.

        New node addresses change which flows are ours: everything is rebuilt. A new metadata generation
        only may rename: each flow's pod attributes are checked against the index on the next `heads()`
        and only flows whose names changed are re-serialized (pod churn must not cost a full rebuild).
        """
        addresses = set(self._interface_addresses())
        if self._index is not None:
            info = self._index.node(self._node)
            if info is not None:
                addresses.update(str(ipaddress.ip_address(a)) for a in info.addresses)
        if frozenset(addresses) != self._node_addresses:
            log.info("node addresses: %s", ",".join(sorted(addresses)))
            self._node_addresses = frozenset(addresses)
            self._node_raw = frozenset(ipaddress.ip_address(a).packed for a in addresses)
            self._cache.clear()
            self._clear_pods()
        generation = self._index.generation if self._index is not None else 0
        if generation != self._generation:
            self._generation = generation
            self._clear_pods()
            self._revalidate = bool(self._cache)

    def _clear_pods(self) -> None:
        for cache in self._pods.values():
            cache.clear()

    @property
    def node_addresses(self) -> frozenset[str]:
        return self._node_addresses or frozenset()

    def heads(self, flows: dict[FlowKey, FlowCounters]) -> list[PointHead | None]:
        """Per flow of `flows`, in its iteration order, the point head to export, or None (not ours).

        A list aligned with the snapshot rather than a dict: this runs over 100,000 flows per interval.
        Keys that left the map are forgotten.
        """
        cache = self._cache
        out: list[PointHead | None] = []
        for key, counters in flows.items():
            start = counters.first_seen_unix_ns
            head = cache.get(key, _MISSING)
            moved = head is not None and abs(head.start_unix_ns - start) > _SAME_START_NS
            stale = head is _MISSING or moved
            if stale:
                head = cache[key] = self._head(key, stable_start(start))
            elif self._revalidate and key not in self._renamed and not self._names_unchanged(key, head):
                if head is None:  # a pod that just appeared in the index: nobody counted its bytes
                    head = cache[key] = self._head(key, stable_start(start))
                else:  # renamed: one last export under the old names, then a new flow (`renamed()`)
                    self._renamed.add(key)
            out.append(head)
        self._revalidate = False
        if len(cache) > len(flows):
            for gone in [k for k in cache if k not in flows]:
                del cache[gone]
                self._renamed.discard(gone)
        self._shared.trim(len(cache))
        return out

    def head_at(self, key: FlowKey, start_unix_ns: int) -> PointHead | None:
        """The flow's point head with its names now and another start (a run begun at a receiver switch),
        not cached. The start is kept to the nanosecond, never a whole second: the kernel flow that follows
        this run (it is evicted after its first delivery) starts on a whole second (`stable_start`), maybe
        the same one, and must be another run."""
        return self._head(key, start_unix_ns + (start_unix_ns % _SECOND_NS == 0))

    def renamed(self) -> list[FlowKey]:
        """Exported flows whose names changed: evict them once this export is delivered (a new run)."""
        return list(self._renamed)

    def leaves_now(self, key: FlowKey, counters: FlowCounters) -> bool:
        """A flow that is not ours leaves the kernel map at once when it can never become ours: its source
        is someone else's (another node's pod, a node) or was rewritten on the way (an un-NATed VIP).
        Forwarded traffic must never push local flows into the overflow bucket. A source nobody knows
        stays until idle: it may be a pod of this node whose metadata is late, and its bytes are counted
        once it is known. Before metadata has synced nothing is known yet."""
        if key.origin == ORIGIN_REWRITTEN or self._index is None:  # never ours; nothing can name a pod
            return True
        if not self._index.ready():
            return False
        return self._index.lookup(address_text(key.src)) is not None

    def final_heads(self, evicted: dict[FlowKey, FlowCounters]) -> dict[FlowKey, PointHead]:
        """Point heads of evicted flows that are ours, for their final value; call before `heads()`.

        The final value must continue the series already exported: the cached head is reused when its
        start matches (same attributes and start, byte for byte), else one is built (a flow evicted by a
        previous process). Nothing is cached: the flow has left the map, `heads()` forgets its key.
        """
        out: dict[FlowKey, PointHead] = {}
        for key, counters in evicted.items():
            start = counters.first_seen_unix_ns
            head = self._cache.pop(key, _MISSING)  # a flow of this key in the map now is a new one
            self._renamed.discard(key)
            if head is None:
                continue  # decided already: not ours (forwarded, arriving, encapsulation)
            if head is _MISSING or abs(head.start_unix_ns - start) > _SAME_START_NS:
                head = self._head(key, stable_start(start))
            if head is not None:
                out[key] = head
        return out

    def head_map(self, flows: dict[FlowKey, FlowCounters]) -> dict[FlowKey, PointHead]:
        """`heads()` as a dict of the exported flows only (tests, small callers)."""
        return {k: h for k, h in zip(flows, self.heads(flows), strict=True) if h is not None}

    def _names_unchanged(self, key: FlowKey, head: PointHead | None) -> bool:
        source = self._source(key)
        if head is None:  # not ours so far: a pod that just appeared in the index makes it ours
            return source is None
        if source is self._node_attrs:  # the node's: its name rides in `common`, no pod
            same_source = not head.source_pod and head.common.endswith(source)
        else:
            same_source = source == head.source_pod
        return same_source and self._named(schema.DESTINATION, key.dst) == head.destination_pod

    def _source(self, key: FlowKey) -> bytes | None:
        """The source's serialized attributes when the flow is ours (the node's name, or the pod's), else
        None: the path decides where the mode tells it, else the address (module docstring)."""
        if key.origin in (ORIGIN_LOCAL, ORIGIN_SNAT):
            return self._node_attrs
        if key.origin == ORIGIN_REWRITTEN:
            return None
        if key.src in self._node_raw:
            return self._node_attrs
        return self._named(schema.SOURCE, key.src) or None

    def _field(self, key: str, value: AttrValue) -> bytes:
        """One serialized attribute (field-7 entry) of a low-cardinality value, shared across flows."""
        piece = self._pieces.get((key, value))
        if piece is None:
            if len(self._pieces) > 4 * max(len(self._cache), 1024):
                log.info("attribute cache cap reached, cleared: entries=%d", len(self._pieces))
                self._pieces.clear()  # bounded: values of evicted flows go
            piece = self._pieces[(key, value)] = attributes(7, ((key, value),))
        return piece

    def _named(self, end: str, raw: bytes) -> bytes:
        """Serialized pod attributes of address `raw` at `end` if it is a pod on this node, else b"".

        Keyed by the raw address (4 or 16 bytes): one entry per address, however many flows it has.
        """
        cache = self._pods[end]
        named = cache.get(raw)
        if named is None:
            if len(cache) > 4 * max(len(self._cache), 1024):
                log.info("pod-name cache cap reached, cleared: end=%s entries=%d", end, len(cache))
                cache.clear()  # bounded like the other caches
            endpoint = self._index.lookup(address_text(raw)) if self._index is not None else None
            local = endpoint is not None and not endpoint.is_node and endpoint.node_name == self._node
            named = cache[raw] = attributes(7, _pod_attrs(end, endpoint)) if local and endpoint else b""
        return named

    def _head(self, key: FlowKey, first_seen_unix_ns: int) -> PointHead | None:
        if _is_loopback(key.dst):
            return None  # never leaves the node
        source = self._source(key)
        if source is None:
            return None  # forwarded or arriving: counted at its source node
        from_node = source is self._node_attrs
        if (
            from_node
            and key.origin != ORIGIN_SNAT
            and key.proto == UDP
            and key.dst_port in self._overlay_ports
        ):
            return None  # encapsulation: the inner packets are counted
        field = self._field
        own = [
            field(schema.SOURCE_ADDRESS, address_text(key.src)),
            # Destinations are many: not cached on their own (the address pair is shared, below).
            attributes(7, ((schema.DESTINATION_ADDRESS, address_text(key.dst)),)),
        ]
        shared = self._shared
        common = [  # the same bytes for every flow of this type, protocol and ports: held once
            field(schema.NETWORK_TYPE, _network_type(key.family)),
            field(schema.NETWORK_TRANSPORT, schema.transport_name(key.proto)),
        ]
        if key.src_port:
            common.append(field(schema.SOURCE_PORT, key.src_port))
        if key.dst_port:
            common.append(field(schema.DESTINATION_PORT, key.dst_port))
        if from_node:
            common.append(source)  # source.k8s.node.name: the same for every node flow, held once
        destination_pod = self._named(schema.DESTINATION, key.dst)
        return point_head(
            shared(b"".join(own)),  # one object per address pair: its flows differ by port or protocol
            first_seen_unix_ns,
            b"" if from_node else source,
            destination_pod,
            shared=shared,
            common=shared(b"".join(common)),
        )


_V6_LOOPBACK = bytes(15) + b"\x01"


def _is_loopback(raw: bytes) -> bool:
    return raw[0] == 127 if len(raw) == 4 else raw == _V6_LOOPBACK


def _network_type(family: int) -> str:
    return (schema.NetworkType.IPV4 if family == AF_INET else schema.NetworkType.IPV6).value


def _pod_attrs(end: str, endpoint: Endpoint) -> list[tuple[str, AttrValue]]:
    pairs = (
        (schema.POD_NAME, endpoint.pod_name),
        (schema.NAMESPACE_NAME, endpoint.namespace),
        (schema.POD_UID, endpoint.pod_uid),
    )
    return [(schema.end_attr(end, suffix), value) for suffix, value in pairs if value]
