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
    build_story(cluster)
    path = metadata.write(cluster, tmp_path_factory.mktemp("meta") / "cluster.json")
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
