"""The demo's Services and EndpointSlices, as the API server and the EndpointSlice controller write them.

A `ServiceSpec` is a plain value (which pods, which ports, which routing); `service_object` and
`endpoint_slices` turn it into the objects `kubectl get services,endpointslices -o json` prints: one slice
per address family, target ports (not the Service port), each endpoint's zone and node, and zone hints set
the way the EndpointSlice controller sets them for the Service's `trafficDistribution`:
`PreferClose` / `PreferSameZone` / `PreferSameNode` give every ready endpoint that has a zone a hint for its
own zone (and `PreferSameNode` one for its node); no setting gives no hints. kube-proxy (demo/kubeproxy.py)
reads exactly these objects. Topology-aware routing's annotation (the controller's proportional allocation)
is not simulated: a spec asking for it is refused rather than faked.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Final

from otel_kzt import schema
from otel_kzt.demo.cluster import Cluster, PodSpec

CREATED: Final = "2026-11-22T08:00:00Z"
LABEL_MANAGED_BY: Final = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY: Final = "endpointslice-controller.k8s.io"
HINTED: Final = frozenset({schema.ROUTING_PREFER_CLOSE, schema.ROUTING_PREFER_SAME_ZONE, "PreferSameNode"})


@dataclass(frozen=True, slots=True)
class ServicePortSpec:
    name: str
    port: int  # what clients dial on the cluster IP
    target_port: int  # what the pods listen on (the EndpointSlice's port)
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    namespace: str
    name: str
    pods: tuple[PodSpec, ...]  # the endpoints (what the selector matches, all ready)
    ports: tuple[ServicePortSpec, ...]
    vip_index: int  # which cluster IP of the address plan (ignored when headless)
    headless: bool = False
    traffic_distribution: str | None = None

    def __post_init__(self) -> None:
        if self.traffic_distribution is not None and self.traffic_distribution not in HINTED:
            raise ValueError(f"trafficDistribution {self.traffic_distribution!r} is not simulated")

    @property
    def app(self) -> str:
        return self.pods[0].app if self.pods else self.name

    def with_distribution(self, value: str | None) -> ServiceSpec:
        return dataclasses.replace(self, traffic_distribution=value)


def _uid(kind: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"otel-kzt-demo/{kind}/{name}"))


def _service_uid(spec: ServiceSpec) -> str:
    return _uid("service", f"{spec.namespace}/{spec.name}")


def cluster_ips(cluster: Cluster, spec: ServiceSpec) -> tuple[str, str] | None:
    """(IPv4, IPv6) cluster IPs, None for a headless Service."""
    if spec.headless:
        return None
    return (cluster.plan.service_ip(spec.vip_index, 4), cluster.plan.service_ip(spec.vip_index, 6))


def service_object(cluster: Cluster, spec: ServiceSpec) -> dict[str, Any]:
    ips = cluster_ips(cluster, spec)
    body: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": ips[0] if ips else "None",
        "clusterIPs": list(ips) if ips else ["None"],
        "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "PreferDualStack" if ips else "RequireDualStack",
        "internalTrafficPolicy": "Cluster",
        "selector": {"app.kubernetes.io/name": spec.app},
        "sessionAffinity": "None",
        "ports": [{"name": p.name, "protocol": p.protocol, "port": p.port, "targetPort": p.target_port}
                  for p in spec.ports],
    }
    if spec.traffic_distribution is not None:
        body["trafficDistribution"] = spec.traffic_distribution
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": spec.name, "namespace": spec.namespace, "uid": _service_uid(spec),
            "resourceVersion": "1000", "creationTimestamp": CREATED,
            "labels": {"app.kubernetes.io/name": spec.app},
        },
        "spec": body,
        "status": {"loadBalancer": {}},
    }


def hints(spec: ServiceSpec, pod: PodSpec) -> dict[str, Any] | None:
    """The hints the EndpointSlice controller gives a ready endpoint of this Service (None: none)."""
    if spec.traffic_distribution not in HINTED:
        return None
    out: dict[str, Any] = {"forZones": [{"name": pod.node.zone}]}
    if spec.traffic_distribution == "PreferSameNode":
        out["forNodes"] = [{"name": pod.node.name}]
    return out


def _endpoint(spec: ServiceSpec, pod: PodSpec, address: str) -> dict[str, Any]:
    endpoint: dict[str, Any] = {
        "addresses": [address],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
        "nodeName": pod.node.name,
        "zone": pod.node.zone,
    }
    hint = hints(spec, pod)
    if hint is not None:
        endpoint["hints"] = hint
    return endpoint


def endpoint_slices(spec: ServiceSpec) -> list[dict[str, Any]]:
    """One slice per address family, named `<service>-<family>` (the controller uses a random suffix)."""
    slices = []
    for family, address_type in ((4, "IPv4"), (6, "IPv6")):
        name = f"{spec.name}-ipv{family}"
        slices.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name, "namespace": spec.namespace, "generateName": f"{spec.name}-",
                "uid": _uid("endpointslice", f"{spec.namespace}/{name}"), "resourceVersion": "1000",
                "creationTimestamp": CREATED,
                "labels": {schema.LABEL_SERVICE_NAME: spec.name, LABEL_MANAGED_BY: MANAGED_BY},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": spec.name,
                                     "uid": _service_uid(spec), "controller": True,
                                     "blockOwnerDeletion": True}],
            },
            "addressType": address_type,
            "endpoints": [_endpoint(spec, p, p.v4 if family == 4 else p.v6) for p in spec.pods],
            "ports": [{"name": p.name, "protocol": p.protocol, "port": p.target_port} for p in spec.ports],
        })  # fmt: skip
    return slices


def objects(cluster: Cluster, specs: tuple[ServiceSpec, ...]) -> list[dict[str, Any]]:
    """Every Service and EndpointSlice of the story, as List items."""
    out: list[dict[str, Any]] = []
    for spec in specs:
        out.append(service_object(cluster, spec))
        out.extend(endpoint_slices(spec))
    return out
