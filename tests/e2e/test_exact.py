"""Every pod pair, both families, every traffic class: the enricher's bytes equal nftables ground truth.

DESIGN §5.1 (exact), §5.2 (once: pod-to-pod packets cross two nodes' POSTROUTING), §5.3 (masquerade keeps
the pod as the source), host-network traffic named by its node.
"""

from __future__ import annotations

import pytest

from otel_kzt import schema
from otel_kzt.demo.cluster import PodSpec
from otel_kzt.demo.runner import ClusterRun
from otel_kzt.demo.view import parse
from otel_kzt.enricher.processing.cost import load_prices
from tests.e2e.conftest import L, expected_class, run_exchanges, wait_exact

pytestmark = pytest.mark.kernel


def _jobs(run: ClusterRun) -> list[tuple[str, str, int, int]]:
    cluster = run.cluster
    pods = cluster.routed_pods()
    targets = [a for p in pods for a in p.addresses] + [a for n in cluster.nodes for a in n.addresses]
    targets += [cluster.plan.internet(4), cluster.plan.internet(6)]
    jobs = []
    for i, pod in enumerate(pods):
        for j, address in enumerate(targets):
            if address in pod.addresses:
                continue
            # Sizes differ per pair, so a byte credited to the wrong pair cannot cancel out.
            jobs.append((pod.netns, address, 300 + 37 * i + j, 2_000 + 1_013 * ((i * 7 + j) % 11)))
    return jobs


def test_every_pair_exact_named_and_classed(e2e: ClusterRun) -> None:
    cluster = e2e.cluster
    run_exchanges(_jobs(e2e))
    want, rows = wait_exact(e2e)

    pods = {a: p for p in cluster.routed_pods() for a in p.addresses}
    nodes = {a: n for n in cluster.nodes for a in n.addresses}
    seen: set[tuple[str, str]] = set()
    for (src, dst, _proto), _bytes in want.items():
        labels = rows[(src, dst, "tcp")].labels
        cls = labels[L(schema.TRAFFIC_CLASS)]
        assert cls == expected_class(cluster, src, dst), (src, dst, labels)
        seen.add((labels[L(schema.NETWORK_TYPE)], cls))
        if src in pods:  # pod source: named as the pod, also when masqueraded to the internet
            assert labels[L(schema.SOURCE_POD_NAME)] == pods[src].name
            assert labels[L(schema.SOURCE_WORKLOAD_NAME)] == pods[src].workload_name
        else:  # host network: named by its node, no pod
            assert labels[L(schema.SOURCE_WORKLOAD_KIND)] == schema.WorkloadKind.NODE.value
            assert labels[L(schema.SOURCE_NODE_NAME)] == nodes[src].name
            assert not labels.get(L(schema.SOURCE_POD_NAME))
    expected = {(family, cls.value) for family in ("ipv4", "ipv6") for cls in (
        schema.TrafficClass.SAME_NODE, schema.TrafficClass.SAME_ZONE, schema.TrafficClass.CROSS_ZONE,
        schema.TrafficClass.EXTERNAL)}
    assert seen == expected


def test_kubezonnet_metric_per_source_pod(e2e: ClusterRun) -> None:
    """`pod_cross_zone_network_traffic_bytes_total{namespace,pod}` = the pod's cross-zone ground truth."""
    cluster = e2e.cluster
    run_exchanges(_jobs(e2e)[::3])
    want, _rows = wait_exact(e2e)
    metric = parse(e2e.scrape(), 0.0).sum_by(f"{schema.PROM_POD_CROSS_ZONE_BYTES}_total",
                                             schema.PROM_POD_CROSS_ZONE_LABELS)
    for pod in cluster.routed_pods():
        truth_bytes = sum(v for (src, dst, _p), v in want.items() if src in pod.addresses
                          and expected_class(cluster, src, dst) == schema.TrafficClass.CROSS_ZONE.value)
        assert truth_bytes > 0, pod.name  # every pod has peers in the other zone
        assert metric.get((pod.namespace, pod.name)) == truth_bytes, pod.name


def test_cost_is_bytes_times_the_providers_price(e2e: ClusterRun) -> None:
    """`kzt_estimated_cost_usd_total` per source workload and billed class = ground-truth bytes x the
    price of the nodes' provider (gce:// provider IDs: GCP), for every pod workload."""
    cluster = e2e.cluster
    run_exchanges(_jobs(e2e)[1::4])
    want, _rows = wait_exact(e2e)
    prices = load_prices(None, "aws")  # the enricher runs with the built-in table and its default
    keys = (L(schema.SOURCE_NAMESPACE_NAME), L(schema.SOURCE_WORKLOAD_NAME), L(schema.TRAFFIC_CLASS))
    cost = parse(e2e.scrape(), 0.0).sum_by(f"{schema.PROM_ESTIMATED_COST}_total", keys)
    expected: dict[tuple[str, str, str], float] = {}
    for (src, dst, _p), value in want.items():
        owner = cluster.owner_of(src)
        cls = expected_class(cluster, src, dst)
        if isinstance(owner, PodSpec) and schema.TrafficClass(cls) in schema.BILLED_CLASSES:
            key = (owner.namespace, owner.workload_name, cls)
            usd = value * prices.per_byte(schema.TrafficClass(cls), "gcp")
            expected[key] = expected.get(key, 0.0) + usd
    assert {k[2] for k in expected} == {"cross-zone", "external"}
    for key, usd in expected.items():
        assert cost.get(key) == pytest.approx(usd, rel=1e-9), key


def test_pod_to_pod_counted_once_at_the_source(e2e: ClusterRun) -> None:
    """Forwarded traffic is not exported by the destination node: totals equal the senders' totals."""
    cluster = e2e.cluster
    web, api = (next(p for p in cluster.routed_pods() if p.workload_name == w) for w in ("web", "api"))
    run_exchanges([(web.netns, api.v4, 5_000, 50_000)] * 4 + [(web.netns, api.v6, 5_000, 50_000)] * 4)
    want, rows = wait_exact(e2e)
    pair_v4 = (api.v4, web.v4, "tcp")
    assert want[pair_v4] > 4 * 50_000  # the responses themselves, plus headers
    assert rows[pair_v4].bytes == want[pair_v4]
    # Replies from the internet reach pods through the node (de-masqueraded, forwarded): never exported.
    internet = {cluster.plan.internet(4), cluster.plan.internet(6)}
    assert not [k for k in rows if k[0] in internet]
    assert sum(r.bytes for k, r in rows.items() if k in want) == sum(want.values())
