"""The demo's Kubernetes List: valid objects, and read back by the project's own decoder as intended."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest

from otel_kzt.demo import metadata
from otel_kzt.demo.cluster import Cluster, make_cluster
from otel_kzt.demo.workloads import build_story
from otel_kzt.k8s.filesource import parse_objects
from otel_kzt.schema import WorkloadKind


@pytest.fixture(scope="module", params=["gke", "eks"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Cluster, Path]:
    cluster = make_cluster("kz", 202, 3, 2, style=request.param)
    story = build_story(cluster)
    path = metadata.write(cluster, tmp_path_factory.mktemp("meta") / "cluster.json", story.services)
    return cluster, path


def test_every_object_is_a_valid_kubernetes_object(written: tuple[Cluster, Path]) -> None:
    _, path = written
    doc = json.loads(path.read_text())
    assert doc["kind"] == "List" and doc["apiVersion"] == "v1"
    for item in doc["items"]:
        kubernetes_validate.validate(item, "1.30", strict=True)


def test_decoder_names_pods_workloads_and_zones(written: tuple[Cluster, Path]) -> None:
    cluster, path = written
    nodes, pods = parse_objects(path.read_text(), str(path))
    zones = {n.name: n.zone for n in nodes}
    assert zones == {n.name: n.zone for n in cluster.nodes}
    assert {n.provider for n in nodes} == {"gcp" if cluster.region == "europe-west1" else "aws"}
    assert all(n.region == cluster.region for n in nodes)
    by_name = {r.endpoint.pod_name: r for r in pods}
    for pod in cluster.pods:
        record = by_name[pod.name]
        assert record.endpoint.workload_kind is pod.workload_kind
        assert record.endpoint.workload_name == pod.workload_name
        assert record.endpoint.node_name == pod.node.name
        assert record.host_network is pod.host_network
        if not pod.host_network:
            assert set(record.ips) == {pod.v4, pod.v6}
    web = next(r for r in pods if r.endpoint.workload_name == "web")
    assert web.endpoint.workload_kind is WorkloadKind.DEPLOYMENT  # resolved through the ReplicaSet


def test_services_and_slices_are_valid_and_unhinted(written: tuple[Cluster, Path]) -> None:
    cluster, path = written
    items = json.loads(path.read_text())["items"]
    services = {i["metadata"]["name"]: i for i in items if i["kind"] == "Service"}
    slices = [i for i in items if i["kind"] == "EndpointSlice"]
    assert set(services) == {"api", "postgres", "node-exporter"}
    for item in [*services.values(), *slices]:
        kubernetes_validate.validate(item, "1.34", strict=True)
    api = services["api"]["spec"]
    assert api["clusterIPs"] == [cluster.plan.service_ip(0, 4), cluster.plan.service_ip(0, 6)]
    assert api["ports"] == [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]
    assert "trafficDistribution" not in api and services["postgres"]["spec"]["clusterIP"] == "None"
    api_slices = [s for s in slices if s["metadata"]["labels"]["kubernetes.io/service-name"] == "api"]
    assert sorted(s["addressType"] for s in api_slices) == ["IPv4", "IPv6"]
    for s in api_slices:
        assert s["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]  # the target port
        assert all("hints" not in e for e in s["endpoints"])  # no trafficDistribution: no hints


def test_prefer_same_zone_hints_each_endpoint_for_its_own_zone() -> None:
    from otel_kzt.demo.services import endpoint_slices

    cluster = make_cluster("kz", 202, 3, 1)
    story = build_story(cluster)
    api = next(s for s in story.services if s.name == "api").with_distribution("PreferSameZone")
    for s in endpoint_slices(api):
        for endpoint in s["endpoints"]:
            assert endpoint["hints"] == {"forZones": [{"name": endpoint["zone"]}]}
    with pytest.raises(ValueError, match="not simulated"):
        api.with_distribution("Magic")
