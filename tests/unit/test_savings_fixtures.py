"""The rules of DESIGN §7 on the shared fixtures, through the real catalog: flows are attributed as the
enricher attributes them (the server's address and *target* port listed by a slice), Services are seen as
`ServiceState.of` the catalog's views, and the setting comes from the cluster's version."""

from __future__ import annotations

from typing import Any

import pytest

from otel_kzt import schema
from otel_kzt.k8s.servicemodel import ClusterVersion, ServiceRef
from otel_kzt.k8s.services import ServiceIndex
from otel_kzt.savings.engine import Engine
from otel_kzt.savings.model import Direction, Flow, Kind, ServiceState, Workload, flow_key
from otel_kzt.savings.recommend import HEADLESS_NOTE, NO_ENDPOINTS_NOTE, recommend
from otel_kzt.savings.version import CURRENT, setting_for
from tests.support.k8s_objects import fresh
from tests.support.service_fixtures import catalog, shapes, slice_for

A, B, C = "eu-west-1a", "eu-west-1b", "eu-west-1c"
WEB = Workload("shop", "Deployment", "web")
WINDOW = 60.0
USD_PER_BYTE = 0.01 / 1e9  # $0.01 per GB each way, as config/prices.yaml prices intra-region crossings


def states(index: ServiceIndex) -> dict[tuple[str, str], ServiceState]:
    return {(v.ref.namespace, v.ref.name): ServiceState.of(v) for v in index.services()}


def zone_of(index: ServiceIndex, address: str) -> str:
    for view in index.services():
        for endpoint in view.endpoints:
            if address in endpoint.addresses:
                return endpoint.zone or ""
    raise AssertionError(address)


def call(index: ServiceIndex, client_zone: str, server: str, port: int, sizes: tuple[float, float],
         *, client: Workload = WEB, server_workload: Workload | None = None) -> list[Flow]:  # fmt: skip
    """A client's connection to `server:port`, both directions, attributed as the enricher does; only
    billed (cross-zone) flows are kept, as the enricher keeps them."""
    request, response = sizes
    ref = index.service_at(server, port, "tcp")
    zone = zone_of(index, server)
    if zone == client_zone:
        return []
    who = server_workload or Workload("shop", "Deployment", ref.name if ref else "unknown")
    key = (ref.namespace, ref.name) if ref else None
    return [Flow(client, client_zone, who, zone, key, Direction.TO, request, request * USD_PER_BYTE),
            Flow(client, client_zone, who, zone, key, Direction.FROM, response, response * USD_PER_BYTE)]


def by_kind(recs: list[Any]) -> dict[Kind, Any]:
    out = {r.kind: r for r in recs}
    assert len(out) == len(recs)
    return out


def checkout_flows(index: ServiceIndex) -> list[Flow]:
    """web in each zone calls checkout (10.0.1.17 in a, 10.0.2.41 in b, 10.0.3.9 in c terminating)."""
    return [*call(index, A, "10.0.2.41", 8080, (100, 5_000)),
            *call(index, B, "10.0.1.17", 8080, (200, 7_000)),
            *call(index, C, "10.0.1.17", 8080, (50, 3_000)), *call(index, C, "10.0.3.9", 8080, (10, 400)),
            *call(index, A, "10.0.3.9", 8080, (20, 600))]  # fmt: skip


def test_clusterip_with_a_terminating_endpoint() -> None:
    index = catalog(shapes())
    flows = checkout_flows(index)
    assert all(f.service == ("shop", "checkout") for f in flows)  # target port 8080, terminating too
    recs, (summary,) = recommend(states(index), flows, WINDOW, CURRENT)
    got = by_kind(recs)
    # Clients in a and b, where checkout has ready endpoints: prefer-same-zone keeps all of it local.
    same = got[Kind.PREFER_SAME_ZONE]
    assert same.bytes_per_second == pytest.approx((100 + 5_000 + 200 + 7_000 + 20 + 600) / WINDOW)
    assert same.endpoints_by_zone == {A: 1, B: 1} and same.zones == (A, B)
    # Zone c has only a terminating endpoint: not ready, so its clients need an endpoint there.
    spread = got[Kind.SPREAD_ENDPOINTS]
    # (its draining connections to the terminating pod in c are same-zone: not billed, not counted)
    assert spread.zones == (C,) and spread.bytes_per_second == pytest.approx((50 + 3_000) / WINDOW)
    assert summary.routing == schema.ROUTING_NONE and summary.type == "ClusterIP"
    assert summary.usd_per_month == pytest.approx(same.usd_per_month + spread.usd_per_month)


def test_the_service_port_is_not_an_endpoint() -> None:
    """A client dialling a pod on the Service port (80) reaches no endpoint of the Service: the slice
    lists 8080. Such flows are no Service's; a single-zone client gives no scrape advice either."""
    index = catalog(shapes())
    flows = call(index, A, "10.0.2.41", 80, (100, 5_000))
    assert {f.service for f in flows} == {None}
    assert recommend(states(index), flows, WINDOW, CURRENT) == ([], [])


def test_dual_stack_service_already_preferring_the_same_zone() -> None:
    index = catalog(shapes(), nodes={"ip-10-0-2-77.eu-west-1.compute.internal": B})
    flows = [*call(index, A, "fd00:2::1f", 8443, (100, 9_000)),  # over IPv6 to the pod in b
             *call(index, B, "10.0.1.30", 8443, (100, 9_000)),  # over IPv4 to the pod in a
             *call(index, C, "10.0.2.31", 8443, (100, 1_000))]  # fmt: skip
    assert {f.service for f in flows} == {("shop", "payments")}
    services = states(index)
    assert services[("shop", "payments")].endpoints_by_zone == {A: 1, B: 1}  # each pod once
    recs, (summary,) = recommend(services, flows, WINDOW, CURRENT)
    assert [r.kind for r in recs] == [Kind.SPREAD_ENDPOINTS]  # c has none; routing is set already
    assert recs[0].setting == "" and recs[0].zones == (C,)
    assert summary.routing == "PreferSameZone" and "already routed PreferSameZone" in summary.note


@pytest.mark.parametrize(("annotations", "distribution", "routing"), [
    ({}, "PreferClose", "PreferClose"),
    ({}, "PreferSameNode", "PreferSameNode"),
    ({schema.ANNOTATION_TOPOLOGY_MODE: "Auto"}, None, schema.ROUTING_TOPOLOGY_AWARE),
    ({schema.ANNOTATION_TOPOLOGY_AWARE_HINTS: "auto"}, None, schema.ROUTING_TOPOLOGY_AWARE),
])  # fmt: skip
def test_a_service_already_set_gets_no_prefer_same_zone(annotations: dict[str, str], distribution: str | None,
                                                         routing: str) -> None:  # fmt: skip
    svc = fresh("service-clusterip")
    svc["metadata"]["annotations"].update(annotations)
    if distribution:
        svc["spec"]["trafficDistribution"] = distribution
    index = catalog([svc, fresh("endpointslice-checkout")])
    recs, (summary,) = recommend(states(index), checkout_flows(index), WINDOW, CURRENT)
    assert [r.kind for r in recs] == [Kind.SPREAD_ENDPOINTS]
    assert summary.routing == routing and f"already routed {routing}" in summary.note


def test_unknown_or_disabled_routing_still_gets_prefer_same_zone() -> None:
    svc = fresh("service-clusterip")
    svc["metadata"]["annotations"][schema.ANNOTATION_TOPOLOGY_MODE] = "Disabled"
    index = catalog([svc, fresh("endpointslice-checkout")])
    recs, _ = recommend(states(index), checkout_flows(index), WINDOW, CURRENT)
    assert Kind.PREFER_SAME_ZONE in by_kind(recs)


def test_headless_service_gets_no_routing_advice_and_the_report_says_why() -> None:
    postgres = slice_for("postgres", "shop", [("10.0.1.50", A), ("10.0.2.50", B)], 5432)
    index = catalog([*shapes(), postgres])
    flows = [*call(index, A, "10.0.2.50", 5432, (500, 50_000)),
             *call(index, B, "10.0.1.50", 5432, (500, 50_000))]
    assert {f.service for f in flows} == {("shop", "postgres")}
    recs, (summary,) = recommend(states(index), flows, WINDOW, CURRENT)
    assert recs == [] and summary.note == HEADLESS_NOTE and summary.routing == schema.ROUTING_HEADLESS
    assert summary.bytes_per_second == pytest.approx(101_000 / WINDOW)  # its cost is still shown


@pytest.mark.parametrize("kind", ["LoadBalancer", "NodePort"])
def test_externally_reached_service_forwarded_by_nodes(kind: str) -> None:
    """ETP Cluster: a node takes the connection and forwards it, often across zones; kube-proxy applies
    the Service's trafficDistribution to that hop too, so the routing setting cuts it."""
    svc = fresh("service-loadbalancer-etp-cluster")
    svc["spec"]["type"] = kind
    ingress = slice_for("ingress-nginx-controller", "ingress-nginx", [("10.0.1.80", A), ("10.0.2.80", B)],
                        8443)  # the named target port "https", resolved by the controller
    index = catalog([svc, ingress])
    nodes = [Workload("", "Node", f"node-{z}") for z in (A, B)]
    flows = [*call(index, A, "10.0.2.80", 8443, (1_000, 90_000), client=nodes[0]),
             *call(index, B, "10.0.1.80", 8443, (1_000, 90_000), client=nodes[1])]  # fmt: skip
    recs, (summary,) = recommend(states(index), flows, WINDOW, CURRENT)
    assert [r.kind for r in recs] == [Kind.PREFER_SAME_ZONE]
    assert recs[0].namespace == "ingress-nginx" and summary.type == kind
    assert recs[0].bytes_per_second == pytest.approx(182_000 / WINDOW)


def test_external_name_service_has_no_endpoints_to_attribute() -> None:
    svc = fresh("service-clusterip")
    svc["metadata"]["name"] = "billing"
    svc["spec"] = {"type": "ExternalName", "externalName": "billing.example.com"}
    index = catalog([*shapes(), svc])
    state = states(index)[("shop", "billing")]
    assert state.type == "ExternalName" and state.zones() == frozenset() and not state.headless
    # Its DNS name leads outside the cluster: no slice lists anything for it, no flow is its.
    assert all(index.services_at(a, 443, "tcp") == () for a in ("10.0.1.17", "172.20.41.17"))


def test_no_ready_endpoint_anywhere() -> None:
    slice_ = fresh("endpointslice-checkout")
    for endpoint in slice_["endpoints"]:
        endpoint["conditions"] = {"ready": False, "serving": False, "terminating": True}
    index = catalog([fresh("service-clusterip"), slice_])
    recs, (summary,) = recommend(states(index), checkout_flows(index), WINDOW, CURRENT)
    assert recs == [] and summary.note == NO_ENDPOINTS_NOTE


@pytest.mark.parametrize(("version", "setting", "command"), [
    (ClusterVersion(1, 34, "v1.34.1"), "PreferSameZone", "patch service checkout -p "
     "'{\"spec\":{\"trafficDistribution\":\"PreferSameZone\"}}'"),
    (ClusterVersion(1, 32, "v1.32.4-eks-1"), "PreferClose", "\"trafficDistribution\":\"PreferClose\""),
    (ClusterVersion(1, 29, "v1.29.10-gke.1"), "topology-mode: Auto",
     "annotate service checkout service.kubernetes.io/topology-mode=Auto"),
    (ClusterVersion(1, 26, "v1.26.0"), "topology-aware-hints: auto",
     "annotate service checkout service.kubernetes.io/topology-aware-hints=auto"),
    (None, "PreferSameZone", "PreferSameZone"),
])  # fmt: skip
def test_the_setting_is_the_one_the_cluster_version_accepts(version: ClusterVersion | None, setting: str,
                                                            command: str) -> None:  # fmt: skip
    index = catalog(shapes())
    index.set_version(version)
    engine = Engine(WINDOW)
    totals: dict[tuple[str, ...], tuple[float, float]] = {}
    engine.update(0.0, states(index), totals, index.cluster_version())
    for f in checkout_flows(index):
        key = flow_key(f.client, f.client_zone, f.server, f.server_zone, service=f.service,
                       direction=f.direction)
        totals[key] = (f.bytes, f.usd)
    report = engine.update(WINDOW, states(index), totals, index.cluster_version())
    same = next(r for r in report.recommendations if r.kind is Kind.PREFER_SAME_ZONE)
    assert report.setting == setting == same.setting == setting_for(version).name
    assert command in same.action
    assert report.kubernetes_version == (version.git_version if version else "")


def test_a_service_the_catalog_no_longer_has_is_left_out() -> None:
    index = catalog(shapes())
    flows = checkout_flows(index)
    services = states(index)
    del services[("shop", "checkout")]
    assert recommend(services, flows, WINDOW, CURRENT) == ([], [])
    assert ServiceRef("shop", "checkout") in index.services_at("10.0.1.17", 8080, "tcp")
