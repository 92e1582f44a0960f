"""Which flows of the kernel map are this node's to export, and what they are called.

A packet is counted once in the cluster: at its source node (DESIGN §5.2). The map holds every flow the
POSTROUTING hook saw, including forwarded and arriving traffic; only flows whose source address is

- a pod running on this node (not hostNetwork: those carry the node's address), from the metadata index, or
- one of this node's own addresses (the Node object's addresses, plus the addresses of the interfaces of
  the agent's network namespace, so node traffic is exported before metadata has synced)

are exported. Overlay encapsulation sent from a node address (UDP to a VXLAN/Geneve port) is not exported:
its inner packets are. Traffic to a loopback address never leaves the node and is not exported either.

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
from dataclasses import dataclass

from otel_kzt import schema
from otel_kzt.agent.encode import AttrValue, PointHead, point_head
from otel_kzt.agent.flows import AF_INET, FlowCounters, FlowKey
from otel_kzt.k8s.model import Endpoint, MetadataIndex

log = logging.getLogger(__name__)

UDP = 17
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


@dataclass(frozen=True, slots=True)
class _Entry:
    first_seen_unix_ns: int
    head: PointHead | None  # None: not ours


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
        self._cache: dict[FlowKey, _Entry] = {}
        self._texts: dict[bytes, str] = {}
        self._state: tuple[int, frozenset[str]] | None = None
        self._node_addresses: frozenset[str] = frozenset()

    def refresh(self) -> None:
        """Re-read node addresses; drop cached names when they or the metadata generation changed."""
        addresses = set(self._interface_addresses())
        if self._index is not None:
            info = self._index.node(self._node)
            if info is not None:
                addresses.update(str(ipaddress.ip_address(a)) for a in info.addresses)
        generation = self._index.generation if self._index is not None else 0
        state = (generation, frozenset(addresses))
        if state != self._state:
            log.debug("flow names invalidated: generation=%d node_addresses=%d", generation, len(addresses))
            self._state = state
            self._node_addresses = state[1]
            self._cache.clear()

    @property
    def node_addresses(self) -> frozenset[str]:
        return self._node_addresses

    def heads(self, flows: dict[FlowKey, FlowCounters]) -> dict[FlowKey, PointHead]:
        """The point heads of the flows to export (call `refresh()` once per interval before)."""
        old = self._cache
        new: dict[FlowKey, _Entry] = {}
        out: dict[FlowKey, PointHead] = {}
        for key, counters in flows.items():
            entry = old.get(key)
            if entry is None or entry.first_seen_unix_ns != counters.first_seen_unix_ns:
                entry = _Entry(counters.first_seen_unix_ns, self._head(key, counters.first_seen_unix_ns))
            new[key] = entry
            if entry.head is not None:
                out[key] = entry.head
        self._cache = new  # keys gone from the map leave the cache
        return out

    def _text(self, raw: bytes) -> str:
        text = self._texts.get(raw)
        if text is None:
            if len(self._texts) > 4 * max(len(self._cache), 1024):
                self._texts.clear()  # bounded: stale addresses of evicted flows go
            text = self._texts[raw] = address_text(raw)
        return text

    def _lookup(self, address: str) -> Endpoint | None:
        return self._index.lookup(address) if self._index is not None else None

    def _local_pod(self, endpoint: Endpoint | None) -> bool:
        return endpoint is not None and not endpoint.is_node and endpoint.node_name == self._node

    def _head(self, key: FlowKey, first_seen_unix_ns: int) -> PointHead | None:
        src, dst = self._text(key.src), self._text(key.dst)
        if ipaddress.ip_address(dst).is_loopback:
            return None
        src_endpoint = self._lookup(src)
        from_node = src in self._node_addresses
        if not from_node and not self._local_pod(src_endpoint):
            return None  # forwarded or arriving: counted at its source node
        if from_node and key.proto == UDP and key.dst_port in self._overlay_ports:
            return None  # encapsulation: the inner packets are counted
        attrs: list[tuple[str, AttrValue]] = [
            (schema.SOURCE_ADDRESS, src),
            (schema.DESTINATION_ADDRESS, dst),
            (schema.NETWORK_TYPE, _network_type(key.family)),
            (schema.NETWORK_TRANSPORT, schema.transport_name(key.proto)),
        ]
        if key.src_port:
            attrs.append((schema.SOURCE_PORT, key.src_port))
        if key.dst_port:
            attrs.append((schema.DESTINATION_PORT, key.dst_port))
        if not from_node and src_endpoint is not None:
            attrs += _pod_attrs(schema.SOURCE, src_endpoint)
        dst_endpoint = self._lookup(dst)
        if self._local_pod(dst_endpoint) and dst_endpoint is not None:
            attrs += _pod_attrs(schema.DESTINATION, dst_endpoint)
        return point_head(attrs, first_seen_unix_ns)


def _network_type(family: int) -> str:
    return (schema.NetworkType.IPV4 if family == AF_INET else schema.NetworkType.IPV6).value


def _pod_attrs(end: str, endpoint: Endpoint) -> list[tuple[str, AttrValue]]:
    pairs = (
        (schema.POD_NAME, endpoint.pod_name),
        (schema.NAMESPACE_NAME, endpoint.namespace),
        (schema.POD_UID, endpoint.pod_uid),
    )
    return [(schema.end_attr(end, suffix), value) for suffix, value in pairs if value]
