"""kube-proxy's topology rule and the nftables it writes, from the objects the metadata file holds."""

from __future__ import annotations

import json
from typing import Any

from otel_kzt.demo import kubeproxy
from otel_kzt.demo.cluster import make_cluster
from otel_kzt.demo.services import objects
from otel_kzt.demo.workloads import build_story
from tests.conftest import FIXTURES


def _story(distribution: str | None = None) -> tuple[Any, list[dict[str, Any]]]:
    cluster = make_cluster("kz", 202, 3, 1)
    story = build_story(cluster)
    specs = tuple(s.with_distribution(distribution) if s.name == "api" else s for s in story.services)
    return cluster, objects(cluster, specs)


def _api_targets(cluster: Any, objs: list[dict[str, Any]], zone: int, family: int = 4) -> set[str]:
    node = cluster.node_at(zone, 0)
    rule = next(r for r in kubeproxy.rules(objs, node) if r.family == family and r.port == 80)
    assert rule.cluster_ip == cluster.plan.service_ip(0, family)
    return {a for a, port in rule.targets if port == 8080}


def test_without_hints_every_node_uses_every_endpoint() -> None:
    cluster, objs = _story()
    api = {p.v4 for p in cluster.pods if p.workload_name == "api"}
    assert len(api) == 2
    for zone in range(3):
        assert _api_targets(cluster, objs, zone) == api
    # Headless Services (postgres, node-exporter) get no rule at all.
    assert {r.port for r in kubeproxy.rules(objs, cluster.nodes[0])} == {80}


def test_prefer_same_zone_keeps_zones_with_an_endpoint_local() -> None:
    cluster, objs = _story("PreferSameZone")
    by_zone = {p.node.zone: p for p in cluster.pods if p.workload_name == "api"}
    for zone in range(2):
        node_zone = cluster.node_at(zone, 0).zone
        assert _api_targets(cluster, objs, zone) == {by_zone[node_zone].v4}
        assert _api_targets(cluster, objs, zone, family=6) == {by_zone[node_zone].v6}
    # Zone c has no endpoint: no hint names it, so kube-proxy falls back to all of them.
    assert _api_targets(cluster, objs, 2) == {p.v4 for p in by_zone.values()}


def _fixture_slice() -> dict[str, Any]:
    return dict(json.loads((FIXTURES / "k8s" / "endpointslice-checkout.json").read_text()))


def _service() -> dict[str, Any]:
    svc = dict(json.loads((FIXTURES / "k8s" / "service-clusterip.json").read_text()))
    return svc


def test_fixture_slice_terminating_endpoint_and_hints() -> None:
    cluster = make_cluster("kz", 202, 3, 1, style="eks")  # zones eu-west-1a, b, c
    objs = [_service(), _fixture_slice()]
    (a, b, c) = (cluster.node_at(z, 0) for z in range(3))
    rule = kubeproxy.rules(objs, a)[0]
    assert (rule.cluster_ip, rule.port, rule.targets) == ("172.20.41.17", 80, (("10.0.1.17", 8080),))
    assert kubeproxy.rules(objs, b)[0].targets == (("10.0.2.41", 8080),)
    # The terminating endpoint in c is not ready: c's node uses the two ready ones (none hinted for c).
    assert kubeproxy.rules(objs, c)[0].targets == (("10.0.1.17", 8080), ("10.0.2.41", 8080))


def test_only_terminating_endpoints_still_serve() -> None:
    cluster = make_cluster("kz", 202, 3, 1, style="eks")
    es = _fixture_slice()
    for endpoint in es["endpoints"][:2]:
        endpoint["conditions"] = {"ready": False, "serving": False, "terminating": True}
    assert kubeproxy.rules([_service(), es], cluster.nodes[0])[0].targets == (("10.0.3.9", 8080),)


def test_ruleset_is_one_atomic_table_replace() -> None:
    cluster, objs = _story("PreferSameZone")
    node = cluster.node_at(0, 0)
    text = kubeproxy.ruleset(node, kubeproxy.rules(objs, node))
    assert text.startswith(f"table inet {kubeproxy.TABLE} {{}}\ndelete table inet {kubeproxy.TABLE}\n")
    assert f"ip daddr {cluster.plan.service_ip(0, 4)} tcp dport 80 jump svc0" in text
    assert "dnat ip6 to [" in text and "numgen random mod 1 vmap" in text
    for hook in ("prerouting", "output"):
        assert f"type nat hook {hook} priority -100" in text
