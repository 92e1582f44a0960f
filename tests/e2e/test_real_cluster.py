"""Issue 10's proof: the address shapes of real clusters (realnet.py), each per-pair total byte-exact
against nftables at the senders (and at the forwarding node for the NodePort hop), with the right class.

DESIGN §3 (who is the source, by path), §5.1 (exact), §5.2 (once).
"""

from __future__ import annotations

import ipaddress

import pytest

from otel_kzt import schema
from otel_kzt.demo.cluster import PodSpec
from tests.e2e import dns, realnet
from tests.e2e.conftest import (
    TEST_PORT,
    E2ERun,
    L,
    Row,
    exchange_from_port,
    expected_class,
    run_exchanges,
    wait_exact,
)

pytestmark = pytest.mark.kernel

NODE = schema.WorkloadKind.NODE.value


def _service_ip(run: E2ERun, address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip in ipaddress.ip_network(run.cluster.plan.service_cidr(ip.version))


def _resolve_catalog(run: E2ERun, pod: PodSpec, server: str) -> tuple[str, str]:
    """The catalog's (IPv4, IPv6) cluster IPs as `pod` resolves them through `server` (its node's DNS)."""
    name = f"{run.real.catalog.name}.{run.real.catalog.namespace}.svc.cluster.local"
    (v4,) = dns.resolve(pod.netns, server, name, dns.TYPE_A)
    (v6,) = dns.resolve(pod.netns, server, name, dns.TYPE_AAAA)
    return v4, v6


def _catalog_jobs(run: E2ERun, clients: list[PodSpec], seed: int) -> list[tuple[str, str, int, int]]:
    jobs = []
    for i, pod in enumerate(clients):
        v4, v6 = _resolve_catalog(run, pod, realnet.NODELOCAL_DNS)
        for k in range(6):  # kube-proxy picks an endpoint per connection: both get some
            jobs += [(pod.netns, v4, seed + 41 * i + k, 3_000 + 997 * k + 13 * i),
                     (pod.netns, v6, seed + 43 * i + k, 2_000 + 991 * k + 17 * i)]
    return jobs


def _assert_named(run: E2ERun, rows: dict[tuple[str, str, str], Row], pair: tuple[str, str, str]) -> None:
    """The pair's class from the cluster model, its source pod or node named as DESIGN §3 says, in every
    series of the pair."""
    for labels in rows[pair].named:
        _assert_labels(run, pair, labels)


def _assert_labels(run: E2ERun, pair: tuple[str, str, str], labels: dict[str, str]) -> None:
    cluster = run.cluster
    src, dst, _proto = pair
    assert labels[L(schema.TRAFFIC_CLASS)] == expected_class(cluster, src, dst), (pair, labels)
    owner = cluster.owner_of(src)
    if isinstance(owner, PodSpec):
        assert labels[L(schema.SOURCE_POD_NAME)] == owner.name, (pair, labels)
    else:
        node = owner if owner is not None else cluster.owner_of(dst)
        node = node.node if isinstance(node, PodSpec) else node
        assert node is not None
        assert labels[L(schema.SOURCE_WORKLOAD_KIND)] == NODE, (pair, labels)
        assert labels[L(schema.SOURCE_NODE_NAME)] == node.name, (pair, labels)
        assert not labels.get(L(schema.SOURCE_POD_NAME)), (pair, labels)
    dst_owner = cluster.owner_of(dst)
    if isinstance(dst_owner, PodSpec):
        assert labels[L(schema.DESTINATION_POD_NAME)] == dst_owner.name, (pair, labels)


def test_service_through_kube_proxy_dnat(e2e: E2ERun) -> None:
    """Pods on iptables-mode nodes call a ClusterIP Service with endpoints in two zones: counted once, at
    the client's node, towards the endpoint pod kube-proxy chose, classed by the endpoint's zone."""
    cluster = e2e.cluster
    # Not the endpoints themselves: a pod reaching itself through its Service needs hairpin masquerade,
    # which the bed's kube-proxy does not do.
    clients = [p for p in cluster.routed_pods()
               if p.node.name != e2e.real.ipvs_node.name and p not in e2e.real.catalog.pods]
    run_exchanges(_catalog_jobs(e2e, clients, 500), port=realnet.SERVICE_PORT)
    _reuse_a_port_of_a_direct_connection(e2e, clients[0])
    want, rows = wait_exact(e2e)
    backends = {a for p in e2e.real.catalog.pods for a in p.addresses}
    service_pairs = [k for k in want if k[1] in backends and cluster.owner_of(k[0]) in clients]
    classes = set()
    for pair in service_pairs:
        _assert_named(e2e, rows, pair)
        classes.add(rows[pair].labels[L(schema.TRAFFIC_CLASS)])
    assert {schema.TrafficClass.CROSS_ZONE.value, schema.TrafficClass.SAME_ZONE.value} <= classes
    assert not [k for k in rows if _service_ip(e2e, k[1]) and k[2] == "tcp"]  # never towards a cluster IP


def _reuse_a_port_of_a_direct_connection(run: E2ERun, client: PodSpec) -> None:
    """The client calls each endpoint directly, then the Service, from one source port: the DNATed reply
    tuple is still held by the direct connection to that endpoint (TIME_WAIT), and conntrack gives the
    connection another source port (its SNAT bit set, the pod's address kept). Pods' ephemeral ports to
    one destination climb in small steps, so this happens by itself once the Service's sequence reaches
    ports the direct one used: the flake of issue 10 (two connections counted twice by the old ground
    truth, and credited to the node by the old datapath)."""
    for family in (0, 1):
        # Below ip_local_port_range (32768-60999): none of the 500 connections above can hold this port in
        # TIME_WAIT without SO_REUSEADDR, which would refuse the bind (it did, in CI: EADDRINUSE).
        sport = 20_404 + family
        for endpoint in run.real.catalog.pods:
            exchange_from_port(client.netns, endpoint.addresses[family], TEST_PORT, sport,
                               request_bytes=600, response_bytes=3_000)
        vip = _resolve_catalog(run, client, realnet.NODELOCAL_DNS)[family]
        exchange_from_port(client.netns, vip, realnet.SERVICE_PORT, sport, request_bytes=700,
                           response_bytes=4_000)


def test_nodelocal_dns_answers_are_the_nodes(e2e: E2ERun) -> None:
    """Every pod asks its node's DNS (169.254.20.10, and the kube-dns cluster IP where node-local-dns binds
    it): the answers are the node's, same-node, never priced as external."""
    cluster = e2e.cluster
    for i, pod in enumerate(cluster.routed_pods()):
        for server in e2e.real.dns_addresses(cluster, pod.node):
            for k in range(3):
                name = f"{'x' * (5 + i + k)}.shop.svc.cluster.local"  # NXDOMAIN: other sizes
                dns.resolve(pod.netns, server, name)
            _resolve_catalog(e2e, pod, server)
    want, rows = wait_exact(e2e)
    answers = [k for k in want if k[2] == "udp"]
    assert len(answers) == sum(len(e2e.real.dns_addresses(cluster, p.node)) for p in cluster.routed_pods())
    for pair in answers:
        _assert_named(e2e, rows, pair)
        assert rows[pair].labels[L(schema.TRAFFIC_CLASS)] == schema.TrafficClass.SAME_NODE.value


def test_ipvs_replies_are_not_counted_again(e2e: E2ERun) -> None:
    """On the IPVS-style node the endpoints' replies reach POSTROUTING already un-NATed to the cluster IP,
    a local address: forwarded, not the node's; the endpoints' nodes counted them at their source."""
    node = e2e.real.ipvs_node
    clients = [p for p in e2e.cluster.routed_pods() if p.node.name == node.name]
    assert clients
    run_exchanges(_catalog_jobs(e2e, clients, 900), port=realnet.SERVICE_PORT)
    want, rows = wait_exact(e2e)
    backends = {a for p in e2e.real.catalog.pods for a in p.addresses}
    for client in clients:
        replies = [k for k in want if k[0] in backends and k[1] in client.addresses]
        assert replies  # counted where the endpoints sent them
        for pair in replies:
            _assert_named(e2e, rows, pair)
    assert not [k for k in rows if _service_ip(e2e, k[0]) and k[2] == "tcp"]


def test_nodeport_external_traffic_policy_cluster(e2e: E2ERun) -> None:
    """The internet calls a NodePort on a node of one zone; kube-proxy forwards it, masqueraded, to the
    endpoint in the other zone. That hop is the node's traffic to the pod (cross-zone, billed), counted
    once; the endpoint's replies are the pod's to that node."""
    cluster = e2e.cluster
    entry = e2e.real.entry_node
    (backend,) = e2e.real.storefront.pods
    assert backend.node.zone != entry.zone
    jobs = [(cluster.internet_netns, address, 700 + 31 * k, 5_000 + 1_009 * k)
            for k in range(4) for address in entry.addresses]
    run_exchanges(jobs, port=realnet.NODE_PORT)
    want, rows = wait_exact(e2e)
    for family in (0, 1):
        hop = (entry.addresses[family], backend.addresses[family], "tcp")
        reply = (backend.addresses[family], entry.addresses[family], "tcp")
        assert want[hop] > 4 * 700 and want[reply] > 5_000 * 4, (hop, reply)
        _assert_named(e2e, rows, hop)
        assert rows[hop].labels[L(schema.TRAFFIC_CLASS)] == schema.TrafficClass.CROSS_ZONE.value
        _assert_named(e2e, rows, reply)
    internet = {cluster.plan.internet(4), cluster.plan.internet(6)}
    assert not [k for k in rows if k[0] in internet]
