"""The story the demo tells: which pods run where, and who calls whom.

Pure values (placement and call plans); `traffic` runs them. The story is the one the product exists for:

- `shop/web`, a Deployment with one replica per zone, calls `shop/api` (two replicas, two zones) through
  its Service's cluster IP, over IPv4 and IPv6 in turn; kube-proxy (kubeproxy.py) picks an endpoint per
  connection, in any zone until the Service prefers the same zone;
- `shop/api` reads from `shop/postgres-0`, a StatefulSet pod that sits in one zone only (its Service is
  headless, as a StatefulSet's governing Service is);
- `monitoring/prometheus-k8s`, one replica per zone for high availability, each scraping every node's
  host-network `node-exporter` (a DaemonSet): the duplicated scrape traffic crosses zones;
- `shop/payments` calls a payment provider on the internet through the node's masquerade.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from otel_kzt.demo.cluster import Cluster, NodeSpec, PodSpec
from otel_kzt.demo.services import ServicePortSpec, ServiceSpec
from otel_kzt.schema import WorkloadKind

WEB_PORT = 8080
API_PORT = 80  # the api Service's port (its endpoints listen on WEB_PORT)
API_VIP = 0  # the api Service's cluster IP number in the address plan
DB_PORT = 5432
EXPORTER_PORT = 9100
INTERNET_PORT = 443
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for generated names


@dataclass(frozen=True, slots=True)
class Listener:
    """A server socket: a netns, a port, bound on every address of the netns (dual-stack)."""

    netns: str
    port: int
    owner: str  # for logs: "shop/api-...", "node-exporter on <node>", "internet"


@dataclass(frozen=True, slots=True)
class Call:
    """A client calling servers in turn: `request_bytes` up, `response_bytes` back, every `period_s`."""

    client: PodSpec
    server: str  # the server's workload, for logs
    targets: tuple[tuple[str, int], ...]  # (address, port), used round-robin
    request_bytes: int
    response_bytes: int
    period_s: float
    fresh_connections: bool = False  # one connection per request: each one is routed (kube-proxy) anew


@dataclass(frozen=True, slots=True)
class Story:
    listeners: tuple[Listener, ...]
    calls: tuple[Call, ...]
    services: tuple[ServiceSpec, ...] = ()


def _name_suffix(seed: str, length: int) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(_SUFFIX_ALPHABET[b % len(_SUFFIX_ALPHABET)] for b in digest[:length])


def add_deployment_pod(cluster: Cluster, namespace: str, name: str, node: NodeSpec, *, replica: int,
                       ports: tuple[int, ...]) -> PodSpec:
    """A Deployment's pod, named `<deployment>-<template hash>-<5 chars>` as the ReplicaSet names it."""
    template_hash = _name_suffix(f"{namespace}/{name}", 10)
    pod_name = f"{name}-{template_hash}-{_name_suffix(f'{namespace}/{name}/{replica}', 5)}"
    return cluster.add_pod(pod_name, namespace, WorkloadKind.DEPLOYMENT, name, node, ports=ports,
                           template_hash=template_hash)


def _both(pod: PodSpec | NodeSpec, port: int) -> tuple[tuple[str, int], tuple[str, int]]:
    return ((pod.v4, port), (pod.v6, port))


def build_story(cluster: Cluster, speed: float = 1.0) -> Story:
    """Place the story's pods on `cluster` (adds them) and return who listens and who calls whom.

    `speed` scales every call rate (2.0: twice the traffic).
    """
    zones = len(cluster.zones())
    web = [add_deployment_pod(cluster, "shop", "web", cluster.node_at(z, 0), replica=z, ports=(WEB_PORT,))
           for z in range(zones)]
    api = [add_deployment_pod(cluster, "shop", "api", cluster.node_at(z, 1 - z), replica=z, ports=(WEB_PORT,))
           for z in range(min(2, zones))]
    db = cluster.add_pod("postgres-0", "shop", WorkloadKind.STATEFULSET, "postgres", cluster.node_at(0, 1),
                         app="postgres", ports=(DB_PORT,))
    payments = add_deployment_pod(cluster, "shop", "payments", cluster.node_at(2, 0), replica=0, ports=())
    exporters = [cluster.add_pod(f"node-exporter-{_name_suffix(n.name, 5)}", "monitoring",
                                 WorkloadKind.DAEMONSET, "node-exporter", n, ports=(EXPORTER_PORT,),
                                 host_network=True) for n in cluster.nodes]
    proms = [cluster.add_pod(f"prometheus-k8s-{z}", "monitoring", WorkloadKind.STATEFULSET,
                             "prometheus-k8s", cluster.node_at(z, 1), app="prometheus", ports=(9090,))
             for z in range(zones)]

    listeners = [Listener(p.netns, WEB_PORT, f"shop/{p.name}") for p in api]
    listeners.append(Listener(db.netns, DB_PORT, "shop/postgres-0"))
    listeners += [Listener(e.netns, EXPORTER_PORT, f"node-exporter on {e.node.name}") for e in exporters]
    listeners.append(Listener(cluster.internet_netns, INTERNET_PORT, "internet"))

    # web calls api through its Service (kube-proxy picks an endpoint per connection), api calls postgres
    # by the pod's own address (a headless Service: what DNS answers).
    api_vips = tuple((cluster.plan.service_ip(API_VIP, family), API_PORT) for family in (4, 6))
    calls = [Call(w, "shop/api", api_vips, 600, 12_000, 0.1 / speed, fresh_connections=True) for w in web]
    calls += [Call(a, "shop/postgres", _both(db, DB_PORT), 300, 40_000, 0.25 / speed) for a in api]
    # Prometheus scrapes over IPv6, as dual-stack clusters increasingly do.
    scrape_targets = tuple((n.v6, EXPORTER_PORT) for n in cluster.nodes)
    calls += [Call(p, "monitoring/node-exporter", scrape_targets, 250, 20_000,
                   1.0 / speed / len(cluster.nodes)) for p in proms]
    internet = ((cluster.plan.internet(4), INTERNET_PORT), (cluster.plan.internet(6), INTERNET_PORT))
    calls.append(Call(payments, "payment provider", internet, 3_000, 800, 0.2 / speed))
    services = (
        ServiceSpec("shop", "api", tuple(api), (ServicePortSpec("http", API_PORT, WEB_PORT),),
                    vip_index=API_VIP),
        # A StatefulSet's governing Service is headless: clients dial the pod's own address.
        ServiceSpec("shop", "postgres", (db,), (ServicePortSpec("pg", DB_PORT, DB_PORT),), vip_index=1,
                    headless=True),
        ServiceSpec("monitoring", "node-exporter", tuple(exporters),
                    (ServicePortSpec("metrics", EXPORTER_PORT, EXPORTER_PORT),), vip_index=2, headless=True),
    )
    return Story(listeners=tuple(listeners), calls=tuple(calls), services=services)
