"""Which flows are the node's own, and their attributes (DESIGN §3, §5.2)."""

from __future__ import annotations

import ipaddress

from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

from otel_kzt import schema
from otel_kzt.agent.flows import (
    AF_INET,
    AF_INET6,
    ORIGIN_LOCAL,
    ORIGIN_REWRITTEN,
    ORIGIN_SNAT,
    ORIGIN_UNKNOWN,
    FlowCounters,
    FlowKey,
)
from otel_kzt.agent.local import LocalFlows, namespace_addresses
from otel_kzt.k8s.model import Endpoint, NodeInfo
from otel_kzt.schema import WorkloadKind
from tests.unit.test_agent_support import FakeIndex

NODE = "node-a"


def key(src: str, dst: str, proto: int = 6, sport: int = 0, dport: int = 0) -> FlowKey:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return FlowKey(AF_INET if s.version == 4 else AF_INET6, s.packed, d.packed, proto, sport, dport)


def pod(name: str, node: str, uid: str) -> Endpoint:
    return Endpoint(node, WorkloadKind.DEPLOYMENT, "web", pod_name=name, namespace="shop", pod_uid=uid)


def index() -> FakeIndex:
    idx = FakeIndex()
    idx.endpoints = {
        "10.0.1.5": pod("web-1", NODE, "uid-1"),
        "10.0.1.6": pod("web-2", NODE, "uid-2"),
        "fd00:1::5": pod("web-6", NODE, "uid-6"),
        "10.0.2.7": pod("db-1", "node-b", "uid-7"),
        "192.168.0.1": Endpoint(NODE, WorkloadKind.NODE, NODE),  # hostNetwork: the node itself
        "192.168.0.2": Endpoint("node-b", WorkloadKind.NODE, "node-b"),
    }
    idx.nodes = {NODE: NodeInfo(NODE, "z1", "r1", None, ("192.168.0.1",))}
    return idx


def attrs_of(local: LocalFlows, k: FlowKey) -> dict[str, object] | None:
    heads = local.head_map({k: FlowCounters(100, 1, 5, 6)})
    if k not in heads:
        return None
    head = heads[k]
    # The attribute fields parse on their own.
    point = NumberDataPoint.FromString(head.attrs + head.common + head.source_pod + head.destination_pod)
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in point.attributes}


def make(idx: FakeIndex | None = None, iface: frozenset[str] = frozenset({"127.0.0.1"})) -> LocalFlows:
    local = LocalFlows(NODE, idx if idx is not None else index(), interface_addresses=lambda: iface)
    local.refresh()
    return local


def test_local_pod_source_is_named_and_remote_destination_is_not() -> None:
    got = attrs_of(make(), key("10.0.1.5", "10.0.2.7", dport=5432))
    assert got == {
        schema.SOURCE_ADDRESS: "10.0.1.5",
        schema.DESTINATION_ADDRESS: "10.0.2.7",
        schema.NETWORK_TYPE: "ipv4",
        schema.NETWORK_TRANSPORT: "tcp",
        schema.DESTINATION_PORT: 5432,
        schema.SOURCE_POD_NAME: "web-1",
        schema.SOURCE_NAMESPACE_NAME: "shop",
        schema.SOURCE_POD_UID: "uid-1",
    }


def test_destination_on_this_node_is_named_and_source_port_kept() -> None:
    got = attrs_of(make(), key("10.0.1.5", "10.0.1.6", proto=17, sport=53))
    assert got is not None
    assert got[schema.SOURCE_PORT] == 53 and schema.DESTINATION_PORT not in got
    assert got[schema.NETWORK_TRANSPORT] == "udp"
    assert (got[schema.DESTINATION_POD_NAME], got[schema.DESTINATION_POD_UID]) == ("web-2", "uid-2")


def test_ipv6_pod() -> None:
    got = attrs_of(make(), key("fd00:1::5", "2001:db8::1", proto=58))
    assert got is not None
    assert (got[schema.NETWORK_TYPE], got[schema.NETWORK_TRANSPORT]) == ("ipv6", "icmp")
    assert got[schema.SOURCE_ADDRESS] == "fd00:1::5"


def test_forwarded_and_arriving_traffic_is_not_ours() -> None:
    local = make()
    assert attrs_of(local, key("10.0.2.7", "10.0.1.5")) is None  # remote pod -> here: counted at node-b
    assert attrs_of(local, key("192.168.0.2", "10.0.2.9")) is None  # another node's address
    assert attrs_of(local, key("8.8.8.8", "10.0.1.5")) is None  # external, arriving


def test_node_addresses_host_network_and_overlay() -> None:
    local = make()
    got = attrs_of(local, key("192.168.0.1", "10.0.2.7", dport=10250))
    assert got is not None and schema.SOURCE_POD_NAME not in got  # host network: no pod attributes
    for port in (4789, 8472, 6081):
        assert attrs_of(local, key("192.168.0.1", "192.168.0.2", proto=17, dport=port)) is None
    assert attrs_of(local, key("192.168.0.1", "192.168.0.2", proto=6, dport=4789)) is not None  # TCP 4789
    assert attrs_of(local, key("10.0.1.5", "10.0.2.7", proto=17, dport=4789)) is not None  # a pod's own


def test_interface_addresses_count_before_metadata_sync_and_loopback_is_skipped() -> None:
    idx = index()
    idx.is_ready = False
    idx.nodes = {}
    local = make(idx, iface=frozenset({"127.0.0.1", "172.30.0.9"}))
    assert attrs_of(local, key("172.30.0.9", "172.30.0.1")) is not None
    assert attrs_of(local, key("10.0.1.5", "10.0.2.7")) is None  # unknown yet: exported after sync
    assert attrs_of(local, key("127.0.0.1", "127.0.0.1")) is None


def test_names_follow_metadata_generation() -> None:
    idx = index()
    local = make(idx)
    k = key("10.0.1.5", "10.0.2.7")
    counters = {k: FlowCounters(1, 1, 5, 6)}
    first = local.head_map(counters)[k]
    assert local.head_map(counters)[k] is first  # cached while nothing changed
    idx.endpoints["10.0.1.5"] = pod("web-1b", NODE, "uid-9")
    local.refresh()
    assert local.head_map(counters)[k] is first  # generation unchanged: the cache is trusted
    idx.generation += 1
    local.refresh()
    # Renamed under the agent (DESIGN §5.7): one last export under the old names, then the flow leaves
    # the kernel map and its next packets are a new flow, a new run, under the new names.
    assert local.head_map(counters)[k] is first
    assert local.renamed() == [k]
    assert local.final_heads({k: counters[k]}) == {k: first}  # its final value: the old series
    assert local.renamed() == []
    counters[k] = FlowCounters(1, 1, 5 + 10**9, 10**9)  # the new flow of that key: later start
    renamed = local.head_map(counters)[k]
    assert b"web-1b" in renamed.source_pod and renamed is not first
    assert renamed.start_unix_ns > first.start_unix_ns
    other = key("10.0.1.6", "10.0.2.7")
    counters[other] = FlowCounters(1, 1, 5, 6)
    kept = local.head_map(counters)[other]
    idx.generation += 1  # something else changed: names of these flows did not
    local.refresh()
    assert local.head_map(counters)[other] is kept


def test_namespace_addresses_lists_loopback() -> None:
    assert "127.0.0.1" in namespace_addresses()


def test_pod_created_later_makes_its_flows_ours() -> None:
    idx = index()
    local = make(idx)
    k = key("10.0.1.9", "10.0.2.7")
    counters = {k: FlowCounters(1, 1, 5, 6)}
    assert local.head_map(counters) == {}
    idx.endpoints["10.0.1.9"] = pod("late-1", NODE, "uid-late")
    idx.generation += 1
    local.refresh()
    assert b"late-1" in local.head_map(counters)[k].source_pod


def test_start_times_are_stable_against_clock_offset_wobble() -> None:
    k = key("10.0.1.5", "10.0.2.7")
    first_seen = 1_700_000_000_999_999_000  # microseconds before a second boundary
    local = make()
    head = local.head_map({k: FlowCounters(1, 1, first_seen, first_seen)})[k]
    assert head.start_unix_ns == 1_700_000_000_000_000_000
    wobbled = local.head_map({k: FlowCounters(2, 2, first_seen + 3_000, first_seen)})[k]
    assert wobbled is head  # same flow, same series
    restarted = make().head_map({k: FlowCounters(2, 2, first_seen - 2_000, first_seen)})[k]
    assert restarted.start_unix_ns == head.start_unix_ns  # a new process agrees
    recreated = local.head_map({k: FlowCounters(1, 1, first_seen + 300 * 10**9, first_seen)})[k]
    assert recreated.start_unix_ns == head.start_unix_ns + 300 * 10**9  # evicted and back: a new start


def okey(src: str, dst: str, origin: int, dport: int = 0) -> FlowKey:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return FlowKey(AF_INET if s.version == 4 else AF_INET6, s.packed, d.packed, 17, 0, dport, origin)


def test_the_path_decides_the_source() -> None:
    """DESIGN §3: what the node's stack sent is the node's whatever its address; what it forwards is a
    local pod's or not ours; the NodePort hop its NAT made is the node's."""
    local = make(iface=frozenset({"127.0.0.1", "10.96.0.10"}))
    node = {schema.SOURCE_NODE_NAME: NODE}
    # NodeLocal DNS answering a pod from its link-local address (on no interface the agent listed).
    dns = attrs_of(local, okey("169.254.20.10", "10.0.1.5", ORIGIN_LOCAL))
    assert dns is not None and dns.items() >= {**node, schema.DESTINATION_POD_NAME: "web-1"}.items()
    assert schema.SOURCE_POD_NAME not in dns
    # The kube-dns ClusterIP NodeLocal DNS answers from, to a pod of another node.
    assert (attrs_of(local, okey("10.96.0.10", "10.0.2.7", ORIGIN_LOCAL)) or {}).items() >= node.items()
    # Forwarded with a source rewritten on the way: a VIP an un-NAT put back (IPVS replies): not again,
    # though the VIP is one of this node's addresses.
    assert attrs_of(local, okey("10.96.0.10", "10.0.1.5", ORIGIN_REWRITTEN)) is None
    assert attrs_of(local, okey("10.0.2.7", "10.0.1.5", ORIGIN_UNKNOWN)) is None  # arriving
    got = attrs_of(local, okey("10.0.1.5", "10.0.2.7", ORIGIN_UNKNOWN))
    assert got is not None and got[schema.SOURCE_POD_NAME] == "web-1"
    # The NodePort hop (DNAT + SNAT by this node) to a backend on another node: the node's.
    hop = attrs_of(local, okey("192.168.0.1", "10.0.2.7", ORIGIN_SNAT, dport=8080))
    assert hop is not None and hop.items() >= node.items() and schema.SOURCE_POD_NAME not in hop
    # Unknown origin (tc, cgroup): by address, as before, the node's addresses named by the node.
    assert (attrs_of(local, key("192.168.0.1", "10.0.2.7")) or {}).items() >= node.items()
    assert attrs_of(local, key("10.0.2.7", "10.0.1.5")) is None


def test_overlay_encapsulation_stays_unexported_from_the_stack() -> None:
    assert attrs_of(make(), okey("192.168.0.1", "192.168.0.2", ORIGIN_LOCAL, dport=4789)) is None


def test_flows_not_ours_leave_at_once_unless_they_may_become_ours() -> None:
    idx = index()
    local = make(idx)
    counters = FlowCounters(1, 1, 5, 6)
    remote = okey("10.0.2.7", "10.0.1.5", ORIGIN_UNKNOWN)  # another node's pod: known, not ours
    vip = okey("10.96.0.10", "10.0.1.5", ORIGIN_REWRITTEN)  # an un-NATed VIP
    unknown = okey("10.0.9.9", "10.0.2.7", ORIGIN_UNKNOWN)  # maybe a pod whose watch event is late
    assert local.leaves_now(remote, counters) and local.leaves_now(vip, counters)
    assert not local.leaves_now(unknown, counters)  # counted once it is known (until idle)
    idx.is_ready = False
    assert not local.leaves_now(remote, counters)  # before sync nothing is known yet
