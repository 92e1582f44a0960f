"""The Service catalog (`index.services`) on the shared fixtures: each Service shape decoded, endpoints by
(address, target port), dual-stack pods once, not-ready and terminating endpoints, grace after leaving,
the file source's Services, and savings off (with the reason) when a file holds none."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from otel_kzt import schema
from otel_kzt.k8s.filesource import NO_SERVICES, FileSource
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.servicedecode import decode_service, decode_slice
from otel_kzt.k8s.servicemodel import ServiceRef
from otel_kzt.k8s.services import ServiceIndex
from tests.support.k8s_objects import as_list, fresh, make_node, make_pod
from tests.support.service_fixtures import CHECKOUT, NOW, PAYMENTS, Clock, catalog, payments_slices, shapes


def test_each_fixture_shape_decodes() -> None:
    clusterip = decode_service(fresh("service-clusterip"))
    assert (clusterip.type, clusterip.cluster_ips, clusterip.headless) == (
        "ClusterIP", ("172.20.41.17",), False)
    assert clusterip.ports[0].port == 80 and clusterip.ports[0].target_port == 8080
    payments = decode_service(fresh("service-prefer-same-zone"))
    assert payments.cluster_ips == ("172.20.9.200", "fd00:20::c8") and payments.traffic_distribution == (
        "PreferSameZone")
    headless = decode_service(fresh("service-headless-topology-auto"))
    assert headless.headless and headless.cluster_ips == () and headless.topology_mode == "Auto"
    lb = decode_service(fresh("service-loadbalancer-etp-cluster"))
    assert (lb.type, lb.external_traffic_policy, lb.ports[0].target_port, lb.ports[0].node_port) == (
        "LoadBalancer", "Cluster", "https", 31443)
    external = fresh("service-clusterip")
    external["spec"] = {"type": "ExternalName", "externalName": "db.example.com"}
    name_only = decode_service(external)
    assert (name_only.type, name_only.cluster_ips, name_only.headless, name_only.ports) == (
        "ExternalName", (), False, ())
    slice_ = decode_slice(fresh("endpointslice-checkout"))
    assert slice_.service == "checkout" and [p.port for p in slice_.ports] == [8080]
    assert [(e.ready, e.serving, e.terminating) for e in slice_.endpoints] == [
        (True, True, False), (True, True, False), (False, True, True)]


def test_routing_of_each_shape() -> None:
    views = {v.ref.name: v for v in catalog(shapes()).services()}
    assert {name: v.routing for name, v in views.items()} == {
        "checkout": schema.ROUTING_NONE,
        "payments": schema.ROUTING_PREFER_SAME_ZONE,
        "postgres": schema.ROUTING_HEADLESS,  # headless wins over its topology annotation
        "ingress-nginx-controller": schema.ROUTING_NONE,
    }
    annotated = fresh("service-clusterip")
    annotated["metadata"]["annotations"][schema.ANNOTATION_TOPOLOGY_MODE] = "Auto"
    annotated["spec"]["trafficDistribution"] = "PreferClose"
    (view,) = catalog([annotated]).services()
    assert view.routing == schema.ROUTING_TOPOLOGY_AWARE  # the annotation wins over the field
    annotated["metadata"]["annotations"] = {schema.ANNOTATION_TOPOLOGY_AWARE_HINTS: "auto"}
    assert catalog([annotated]).services()[0].routing == schema.ROUTING_TOPOLOGY_AWARE
    annotated["metadata"]["annotations"] = {schema.ANNOTATION_TOPOLOGY_MODE: "Disabled"}
    assert catalog([annotated]).services()[0].routing == "PreferClose"


def test_endpoints_by_target_port_never_the_service_port() -> None:
    index = catalog(shapes())
    assert index.services_at("10.0.1.17", 8080, "tcp") == (CHECKOUT,)
    assert index.services_at("10.0.1.17", 80, "tcp") == ()  # the Service port is the ClusterIP's
    assert index.services_at("10.0.1.17", 8080, "udp") == ()
    assert index.services_at("172.20.41.17", 80, "tcp") == ()  # a ClusterIP is no endpoint
    assert index.services_at("10.0.3.9", 8080, "TCP") == (CHECKOUT,)  # terminating: still draining
    assert index.service_at("fd00:2::1f", 8443, "tcp") == PAYMENTS


def test_a_cluster_ip_names_its_service_until_it_moves_or_goes() -> None:
    index = catalog(shapes())
    assert index.service_of_vip("172.20.41.17") == CHECKOUT
    assert index.service_of_vip("172.20.9.200") == index.service_of_vip("fd00:20::c8") == PAYMENTS
    assert index.service_of_vip("10.0.1.17") is None  # an endpoint is no VIP
    assert index.service_of_vip("None") is None  # headless: no VIP at all
    index.delete_service(PAYMENTS)
    assert index.service_of_vip("172.20.9.200") is None
    moved = fresh("service-clusterip")
    moved["spec"]["clusterIP"], moved["spec"]["clusterIPs"] = "172.20.41.99", ["172.20.41.99"]
    index.upsert_service(decode_service(moved))
    assert index.service_of_vip("172.20.41.17") is None and index.service_of_vip("172.20.41.99") == CHECKOUT
    # A full listing in which another Service took the old address (released, then re-allocated).
    taker = fresh("service-prefer-same-zone")
    taker["spec"]["clusterIPs"] = ["172.20.41.99"]
    index.replace_services([decode_service(taker), decode_service(fresh("service-clusterip"))])
    assert index.service_of_vip("172.20.41.99") == PAYMENTS
    assert index.service_of_vip("172.20.41.17") == CHECKOUT
    index.note_failure("api-services", "list/watch services: HTTP 403 Forbidden", refused=True)
    assert index.service_of_vip("172.20.41.17") is None  # refused: unknown, never stale


def test_ready_endpoints_by_zone_dual_stack_once_terminating_not() -> None:
    views = {v.ref.name: v for v in catalog(shapes(), nodes={
        "ip-10-0-2-77.eu-west-1.compute.internal": "eu-west-1b"}).services()}
    checkout = views["checkout"]
    assert checkout.endpoints_by_zone("ready") == {"eu-west-1a": 1, "eu-west-1b": 1}
    assert checkout.endpoints_by_zone("terminating") == {"eu-west-1c": 1}
    assert checkout.endpoints_by_zone("serving") == {"eu-west-1a": 1, "eu-west-1b": 1, "eu-west-1c": 1}
    payments = views["payments"]
    assert payments.dual_stack and len(payments.endpoints) == 4
    assert payments.endpoints_by_zone("ready") == {"eu-west-1a": 1, "eu-west-1b": 1}  # zone from its node
    assert views["postgres"].endpoints == () and views["ingress-nginx-controller"].endpoints == ()


def test_an_endpoint_that_left_answers_for_the_grace_period() -> None:
    clock = Clock()
    index = catalog(shapes(), clock)
    before = index.generation
    index.replace_slices([decode_slice(s) for s in payments_slices()])  # checkout's slice is gone
    assert index.generation != before
    assert index.services_at("10.0.1.17", 8080, "tcp") == (CHECKOUT,)
    clock.t += 61
    assert index.services_at("10.0.1.17", 8080, "tcp") == ()
    assert index.services_at("10.0.1.17", 8080, "tcp", at_unix_s=NOW + 30) == (CHECKOUT,)  # a late point


def test_two_services_listing_one_endpoint_answer_by_name() -> None:
    other = fresh("endpointslice-checkout")
    other["metadata"]["name"] = "basket-1"
    other["metadata"]["labels"][schema.LABEL_SERVICE_NAME] = "basket"
    basket = fresh("service-clusterip")
    basket["metadata"]["name"] = "basket"
    index = catalog([*shapes(), basket, other])
    assert index.services_at("10.0.1.17", 8080, "tcp") == (ServiceRef("shop", "basket"), CHECKOUT)


def test_a_portless_slice_lists_every_port() -> None:
    slice_ = fresh("endpointslice-checkout")
    slice_["ports"] = []
    index = catalog([fresh("service-clusterip"), slice_])
    assert index.services_at("10.0.1.17", 9999, "tcp") == (CHECKOUT,)


def test_routing_and_zone_changes_are_timed() -> None:
    clock = Clock()
    index = catalog(shapes(), clock)
    assert all(v.changed_unix_s is None for v in index.services())
    clock.t += 10
    svc = fresh("service-clusterip")
    svc["spec"]["trafficDistribution"] = "PreferSameZone"
    index.upsert_service(decode_service(svc))
    assert index.service(CHECKOUT).changed_unix_s == NOW + 10  # type: ignore[union-attr]
    clock.t += 10
    slice_ = fresh("endpointslice-checkout")
    slice_["endpoints"][0]["conditions"]["ready"] = False  # zone a has no ready endpoint any more
    index.upsert_slice(decode_slice(slice_))
    view = index.service(CHECKOUT)
    assert view is not None and view.changed_unix_s == NOW + 20
    assert view.endpoints_by_zone("ready") == {"eu-west-1b": 1}
    clock.t += 10
    slice_["endpoints"][1]["addresses"] = ["10.0.2.42"]  # a new pod, same zones: no change recorded
    index.upsert_slice(decode_slice(slice_))
    assert index.service(CHECKOUT).changed_unix_s == NOW + 20  # type: ignore[union-attr]


def test_unavailable_until_listed_and_while_refused() -> None:
    index = ServiceIndex()
    assert not index.available() and index.reason() == "no source of Services"
    index.register_source("api-services")
    index.register_source("api-endpointslices")
    index.mark_synced("api-services")
    assert not index.available() and index.reason() == ""  # merely not listed yet
    index.note_failure("api-endpointslices", "timeout", refused=False)
    assert index.reason() == ""  # a timeout is retried quietly
    index.note_failure("api-endpointslices", "list/watch endpointslices: HTTP 403 Forbidden", refused=True)
    index.mark_synced("api-services")
    assert not index.available() and "403" in index.reason()
    assert index.services_at("10.0.1.17", 8080, "tcp") == () and index.services() == ()
    index.mark_synced("api-endpointslices")
    assert index.available() and index.reason() == ""


def test_the_endpoint_cap_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    index = ServiceIndex(max_endpoints=2)
    index.register_source("t")
    index.replace_services([decode_service(fresh("service-clusterip"))])
    index.replace_slices([decode_slice(fresh("endpointslice-checkout"))])  # three endpoints
    index.mark_synced("t")
    assert index.endpoints_dropped == 1 and "service endpoint cache full" in caplog.text
    assert sum(bool(index.services_at(a, 8080, "tcp")) for a in ("10.0.1.17", "10.0.2.41", "10.0.3.9")) == 2
    index.replace_slices([])
    index.replace_slices([decode_slice(fresh("endpointslice-checkout"))])  # room again after leaving
    assert index.endpoints_dropped == 2


def _write(path: Path, objects: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(as_list(objects)))


def test_file_source_feeds_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    node = make_node("ip-10-0-1-23.eu-west-1.compute.internal", ["10.0.1.23"], zone="eu-west-1a")
    _write(path, [node, make_pod("checkout-1", node["metadata"]["name"], ["10.0.1.17"]), *shapes()])
    index = ClusterIndex()
    source = FileSource(str(path), index)
    source.poll()
    assert index.ready() and index.services.available()
    assert index.services.service_at("10.0.1.17", 8080, "tcp") == CHECKOUT
    assert index.services.service_count == 4 and index.services.slice_count == 3
    # Re-written without the Services: off, and it says what to write.
    _write(path, [node])
    os.utime(path, ns=(1, 1))
    assert source.poll()
    assert index.ready() and not index.services.available() and index.services.reason() == NO_SERVICES


def test_node_zone_fallback_follows_the_node(tmp_path: Path) -> None:
    index = ClusterIndex()
    index.register_source("t")
    index.services.register_source("t")
    slices = [decode_slice(s) for s in payments_slices()]
    index.services.replace_services([decode_service(fresh("service-prefer-same-zone"))])
    index.services.replace_slices(slices)
    index.services.mark_synced("t")
    index.mark_synced("t")
    assert index.services.services()[0].endpoints_by_zone() == {"eu-west-1a": 1, None: 1}
    index.upsert_node(copy.deepcopy(_node_info("eu-west-1c")))
    assert index.services.services()[0].endpoints_by_zone() == {"eu-west-1a": 1, "eu-west-1c": 1}


def _node_info(zone: str) -> Any:
    from otel_kzt.k8s.model import NodeInfo

    return NodeInfo("ip-10-0-2-77.eu-west-1.compute.internal", zone, "eu-west-1", "aws", ("10.0.2.77",))
