"""The demo's cluster model and story: addresses unique, placement tells the story, names fit the kernel."""

from __future__ import annotations

import ipaddress

import pytest

from otel_kzt.demo.cluster import PodSpec, make_cluster
from otel_kzt.demo.workloads import build_story
from otel_kzt.netns import IFNAME_MAX
from otel_kzt.schema import WorkloadKind


def test_three_zones_two_nodes_each_with_unique_addresses() -> None:
    cluster = make_cluster("kz", 202, 3, 2)
    build_story(cluster)
    assert cluster.zones() == ["europe-west1-a", "europe-west1-b", "europe-west1-c"]
    assert [n.zone for n in cluster.nodes] == [z for z in cluster.zones() for _ in range(2)]
    routed = cluster.routed_pods()
    addresses = [a for p in routed for a in p.addresses] + [a for n in cluster.nodes for a in n.addresses]
    assert len(addresses) == len(set(addresses))
    assert len({p.netns for p in routed}) == len(routed)
    for pod in routed:
        assert ipaddress.ip_address(pod.v4) in ipaddress.ip_network(cluster.plan.pod_cidr(pod.node.index, 4))
        assert ipaddress.ip_address(pod.v6) in ipaddress.ip_network(cluster.plan.pod_cidr(pod.node.index, 6))
        assert ipaddress.ip_address(pod.v4).is_private and ipaddress.ip_address(pod.v6).is_private
    assert len(cluster.host_link) <= IFNAME_MAX
    # Node names name the agents' pin directories, and bpffs refuses names containing a dot.
    assert all("." not in n.name for n in cluster.nodes)
    assert len({n.name for n in cluster.nodes} | {n.name for n in make_cluster("kzd", 201, 3, 2).nodes}) == 12


def test_story_places_each_class_of_traffic() -> None:
    cluster = make_cluster("kz", 202, 3, 2)
    story = build_story(cluster)
    by_workload: dict[str, list[str]] = {}
    for pod in cluster.pods:
        by_workload.setdefault(pod.workload_name, []).append(pod.node.zone)
    assert sorted(by_workload["web"]) == cluster.zones()  # one replica per zone
    assert len(set(by_workload["api"])) == 2
    assert by_workload["postgres"] == ["europe-west1-a"]
    assert sorted(by_workload["prometheus-k8s"]) == cluster.zones()
    exporters = [p for p in cluster.pods if p.workload_name == "node-exporter"]
    assert len(exporters) == len(cluster.nodes)
    assert all(p.host_network and p.workload_kind is WorkloadKind.DAEMONSET for p in exporters)
    assert all(p.v4 == p.node.v4 for p in exporters)  # host network: the node's own address

    classes = set()
    for call in story.calls:
        for address, _port in call.targets:
            owner = cluster.owner_of(address)
            if owner is None:
                classes.add("external")
                continue
            server_node = owner.node if isinstance(owner, PodSpec) else owner
            if server_node.name == call.client.node.name:
                classes.add("same-node")
            elif server_node.zone == call.client.node.zone:
                classes.add("same-zone")
            else:
                classes.add("cross-zone")
    assert classes == {"same-node", "same-zone", "cross-zone", "external"}
    families = {":" in a for call in story.calls for a, _ in call.targets}
    assert families == {True, False}  # dual-stack traffic


def test_small_clusters_still_place_every_workload() -> None:
    cluster = make_cluster("kz", 202, 1, 1)
    story = build_story(cluster)
    assert {p.node.name for p in cluster.pods} == {cluster.nodes[0].name}
    assert story.calls and story.listeners


@pytest.mark.parametrize(("zones", "per_zone"), [(0, 1), (27, 1), (3, 0), (10, 11)])
def test_bad_sizes_are_refused(zones: int, per_zone: int) -> None:
    with pytest.raises(ValueError):
        make_cluster("kz", 202, zones, per_zone)


def test_eks_style_names_and_provider_ids() -> None:
    cluster = make_cluster("kz", 202, 3, 1, style="eks")
    assert cluster.zones() == ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    node = cluster.nodes[0]
    assert node.name == "ip-10-202-0-11.eu-west-1.compute.internal"  # dotted, as EKS names nodes
    assert node.provider_id.startswith("aws:///eu-west-1a/i-0")
    with pytest.raises(ValueError):
        make_cluster("kz", 202, 1, 1, style="aks")
