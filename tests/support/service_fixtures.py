"""The shared Service fixtures as a catalog: every shape (ClusterIP with a terminating endpoint,
dual-stack PreferSameZone, headless with the topology annotation, LoadBalancer with ETP Cluster) and
slices made the way the EndpointSlice controller writes them for those that have none."""

from __future__ import annotations

import json
from typing import Any

from otel_kzt import schema
from otel_kzt.k8s.filesource import parse_all
from otel_kzt.k8s.servicemodel import ServiceRef
from otel_kzt.k8s.services import ServiceIndex
from tests.support.k8s_objects import as_list, fresh

CHECKOUT = ServiceRef("shop", "checkout")
PAYMENTS = ServiceRef("shop", "payments")
NOW = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def payments_slices() -> list[dict[str, Any]]:
    """Dual-stack slices of the PreferSameZone fixture Service: two pods, each in an IPv4 and an IPv6
    slice, one pod without a zone of its own (its node's label gives it), target port 8443."""
    slices = []
    for family, addresses in (("IPv4", ("10.0.1.30", "10.0.2.31")), ("IPv6", ("fd00:1::1e", "fd00:2::1f"))):
        obj = fresh("endpointslice-checkout")
        obj["metadata"]["name"] = f"payments-{family.lower()}"
        obj["metadata"]["labels"][schema.LABEL_SERVICE_NAME] = "payments"
        obj["addressType"] = family
        eps = obj["endpoints"][:2]
        for i, (ep, address) in enumerate(zip(eps, addresses, strict=True)):
            ep["addresses"] = [address]
            ep["targetRef"]["name"] = f"payments-{i}"
        del eps[1]["zone"]  # older controllers: the node's zone label says it
        obj["endpoints"] = eps
        obj["ports"] = [{"name": "http", "protocol": "TCP", "port": 8443}]
        slices.append(obj)
    return slices


def shapes() -> list[dict[str, Any]]:
    return [fresh("service-clusterip"), fresh("endpointslice-checkout"), fresh("service-prefer-same-zone"),
            *payments_slices(), fresh("service-headless-topology-auto"),
            fresh("service-loadbalancer-etp-cluster")]  # fmt: skip


def catalog(objects: list[dict[str, Any]], clock: Clock | None = None,
            nodes: dict[str, str] | None = None) -> ServiceIndex:  # fmt: skip
    parsed = parse_all(json.dumps(as_list(objects)))
    zones = nodes or {}
    index = ServiceIndex(node_zone=zones.get, grace_s=60.0, clock=clock or Clock())
    index.register_source("test")
    index.replace_services(parsed.services)
    index.replace_slices(parsed.slices)
    index.mark_synced("test")
    return index


def slice_for(service: str, namespace: str, addresses: list[tuple[str, str | None]], port: int,
              *, ready: bool = True) -> dict[str, Any]:  # fmt: skip
    """An IPv4 slice of `service`: one ready pod endpoint per (address, zone), listing target `port`."""
    obj = fresh("endpointslice-checkout")
    obj["metadata"].update(name=f"{service}-abcde", namespace=namespace)
    obj["metadata"]["labels"][schema.LABEL_SERVICE_NAME] = service
    template = obj["endpoints"][0]
    obj["endpoints"] = []
    for i, (address, zone) in enumerate(addresses):
        ep = json.loads(json.dumps(template))
        ep.update(addresses=[address], conditions={"ready": ready, "serving": ready, "terminating": False})
        ep["targetRef"].update(name=f"{service}-{i}", namespace=namespace)
        ep.pop("hints")
        if zone is None:
            del ep["zone"]
        else:
            ep["zone"] = zone
        obj["endpoints"].append(ep)
    obj["ports"] = [{"name": "p", "protocol": "TCP", "port": port}]
    return obj
