"""Services and EndpointSlices (`discovery.k8s.io/v1`) decoded from raw JSON into the few fields we keep.

The same objects come from a `kubectl get ... services,endpointslices -o yaml` List and from list/watch.
A slice names its Service by the `kubernetes.io/service-name` label and lists *target* ports (8080, the
name `http` already resolved), never the Service port; its conditions default as Kubernetes documents
(`ready` absent = true, `serving` absent = ready, `terminating` absent = false).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otel_kzt import schema
from otel_kzt.k8s.decode import canonical_ip
from otel_kzt.k8s.servicemodel import EndpointPort, ServicePort, ServiceRef


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """A Service's spec as the catalog keeps it (its endpoints come from the slices)."""

    ref: ServiceRef
    uid: str
    type: str
    cluster_ips: tuple[str, ...]  # () when headless or ExternalName
    headless: bool
    ports: tuple[ServicePort, ...]
    traffic_distribution: str | None
    topology_mode: str | None
    external_traffic_policy: str | None
    internal_traffic_policy: str | None


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    zone: str | None  # the slice's own field; the catalog falls back to the node's zone label
    node_name: str | None
    pod_namespace: str | None
    pod_name: str | None
    ready: bool
    serving: bool
    terminating: bool
    hint_zones: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SliceRecord:
    namespace: str
    name: str
    service: str | None  # the `kubernetes.io/service-name` label; None: a slice of no Service
    address_type: str  # IPv4, IPv6, FQDN
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[SliceEndpoint, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def service_ref(self) -> ServiceRef | None:
        return ServiceRef(self.namespace, self.service) if self.service else None


def decode_service(obj: Mapping[str, Any]) -> ServiceRecord:
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    annotations = meta.get("annotations") or {}
    kind = spec.get("type") or "ClusterIP"
    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    headless = kind != "ExternalName" and (spec.get("clusterIP") == "None" or "None" in raw_ips)
    ips = tuple(ip for ip in (canonical_ip(str(text)) for text in raw_ips) if ip is not None)
    ports = tuple(
        ServicePort(
            name=str(p.get("name") or ""),
            protocol=str(p.get("protocol") or "TCP"),
            port=int(p["port"]),
            target_port=_target(p.get("targetPort"), int(p["port"])),
            node_port=int(p["nodePort"]) if p.get("nodePort") else None,
        )
        for p in spec.get("ports") or ()
    )
    topology = annotations.get(schema.ANNOTATION_TOPOLOGY_MODE)
    if topology is None:
        topology = annotations.get(schema.ANNOTATION_TOPOLOGY_AWARE_HINTS)
    return ServiceRecord(
        ref=ServiceRef(str(meta["namespace"]), str(meta["name"])),
        uid=str(meta.get("uid") or ""),
        type=kind,
        cluster_ips=() if headless or kind == "ExternalName" else ips,
        headless=headless,
        ports=ports,
        traffic_distribution=spec.get("trafficDistribution") or None,
        topology_mode=topology,
        external_traffic_policy=spec.get("externalTrafficPolicy") if kind in ("NodePort", "LoadBalancer")
        else None,
        internal_traffic_policy=spec.get("internalTrafficPolicy"),
    )


def _target(value: Any, port: int) -> int | str:
    """`targetPort` as written: a number, a container port's name, or (absent) the Service port."""
    if value is None or value == "":
        return port
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    return str(value)


def decode_slice(obj: Mapping[str, Any]) -> SliceRecord:
    meta = obj["metadata"]
    labels = meta.get("labels") or {}
    address_type = str(obj.get("addressType") or "IPv4")
    ports = tuple(
        EndpointPort(
            name=str(p.get("name") or ""),
            protocol=str(p.get("protocol") or "TCP"),
            port=int(p["port"]) if p.get("port") is not None else None,
        )
        for p in obj.get("ports") or ()
    )
    return SliceRecord(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        service=labels.get(schema.LABEL_SERVICE_NAME) or None,
        address_type=address_type,
        ports=ports,
        endpoints=tuple(_endpoint(e) for e in obj.get("endpoints") or ()),
    )


def _endpoint(raw: Mapping[str, Any]) -> SliceEndpoint:
    conditions = raw.get("conditions") or {}
    ready = conditions.get("ready")
    ready = True if ready is None else bool(ready)
    serving = conditions.get("serving")
    target = raw.get("targetRef") or {}
    is_pod = target.get("kind") == "Pod"
    hints = (raw.get("hints") or {}).get("forZones") or ()
    return SliceEndpoint(
        addresses=tuple(ip for ip in (canonical_ip(str(a)) for a in raw.get("addresses") or ()) if ip),
        zone=raw.get("zone") or None,
        node_name=raw.get("nodeName") or None,
        pod_namespace=target.get("namespace") if is_pod else None,
        pod_name=target.get("name") if is_pod else None,
        ready=ready,
        serving=ready if serving is None else bool(serving),
        terminating=bool(conditions.get("terminating") or False),
        hint_zones=tuple(str(h["name"]) for h in hints if h.get("name")),
    )
