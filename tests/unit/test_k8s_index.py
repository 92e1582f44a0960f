"""ClusterIndex: readiness, pod/node bindings, IP reuse history with its grace period, generations."""

from __future__ import annotations

import pytest

from otel_kzt.k8s.decode import PodRecord, decode_node, decode_pod
from otel_kzt.k8s.index import MAX_SPANS_PER_IP, ClusterIndex
from otel_kzt.schema import WorkloadKind
from tests.support.k8s_objects import fresh, make_node, make_pod


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(clock: Clock) -> ClusterIndex:
    idx = ClusterIndex(grace_s=300.0, clock=clock)
    idx.register_source("test")
    idx.mark_synced("test")
    return idx


def pod(name: str, ip: str | None, *, phase: str = "Running") -> PodRecord:
    return decode_pod(make_pod(name, "n1", [ip] if ip else [], phase=phase, uid=f"uid-{name}"))


def pod_at(index: ClusterIndex, ip: str, at: float | None = None) -> str | None:
    """The pod name `ip` resolves to (at `at`), or None."""
    found = index.lookup(ip, at)
    return found.pod_name if found else None


def test_not_ready_until_every_source_synced(clock: Clock) -> None:
    idx = ClusterIndex(clock=clock)
    idx.register_source("pods")
    idx.register_source("nodes")
    idx.upsert_pod(pod("a", "10.0.0.5"))
    idx.upsert_node(decode_node(make_node("n1", ["10.1.0.1"])))
    assert not idx.ready()
    assert idx.lookup("10.0.0.5") is None  # unknown, never a guess
    assert idx.node("n1") is None
    idx.mark_synced("pods")
    assert not idx.ready() and idx.lookup("10.0.0.5") is None
    generation = idx.generation
    idx.mark_synced("nodes")
    assert idx.ready() and idx.generation > generation
    found = idx.lookup("10.0.0.5")
    assert found is not None and found.pod_name == "a"
    assert idx.node("n1") is not None


def test_node_addresses_and_host_network_pods_name_the_node(index: ClusterIndex) -> None:
    index.upsert_node(decode_node(fresh("node-eks")))
    index.upsert_pod(decode_pod(fresh("pod-daemonset-hostnetwork")))
    for ip in ("10.0.12.34", "3.91.22.14"):
        found = index.lookup(ip)
        assert found is not None and found.is_node
        assert found.workload_kind is WorkloadKind.NODE
        assert found.workload_name == found.node_name == "ip-10-0-12-34.ec2.internal"
        assert found.pod_name is None and found.namespace is None and found.pod_uid is None


def test_dual_stack_pod_answers_on_both_families(index: ClusterIndex) -> None:
    index.upsert_pod(decode_pod(fresh("pod-dualstack-bare")))
    v4, v6 = index.lookup("10.244.3.9"), index.lookup("fd00:10:244:3::9")
    assert v4 is not None and v4 == v6 and v4.pod_name == "debug-shell"


def test_ip_reuse_is_named_on_both_sides(index: ClusterIndex, clock: Clock) -> None:
    index.upsert_pod(pod("old", "10.0.0.5"))
    clock.now = 1100.0
    index.delete_pod("uid-old")
    clock.now = 1110.0
    index.upsert_pod(pod("new", "10.0.0.5"))

    def name(at: float | None) -> str | None:
        found = index.lookup("10.0.0.5", at)
        return found.pod_name if found else None

    assert name(1050.0) == "old"  # measured before the deletion
    assert name(1105.0) == "old"  # after the deletion, before the reuse: a late report of the old pod
    assert name(1110.0) == "new"
    assert name(None) == "new"
    # Past the grace period the old name is forgotten: before the reuse is now unknown, not "new".
    clock.now = 1100.0 + 301.0
    index.expire()
    assert name(1050.0) is None
    assert name(1500.0) == "new"


def test_released_ip_answers_for_the_grace_period_then_forgets(index: ClusterIndex, clock: Clock) -> None:
    index.upsert_pod(pod("job", "10.0.0.7"))
    clock.now = 2000.0
    index.upsert_pod(pod("job", "10.0.0.7", phase="Succeeded"))
    found = index.lookup("10.0.0.7")
    assert found is not None and found.pod_name == "job"
    assert index.lookup("10.0.0.7", 2000.0 + 400.0) is None  # long after the release
    clock.now = 2000.0 + 300.5
    index.expire()
    assert index.lookup("10.0.0.7") is None
    assert index.lookup("10.0.0.7", 1500.0) is None


def test_missed_delete_still_keeps_the_displaced_pod(index: ClusterIndex, clock: Clock) -> None:
    """A new pod shows up with an IP whose old holder's deletion we have not seen yet."""
    index.upsert_pod(pod("a", "10.0.0.9"))
    clock.now = 1200.0
    index.upsert_pod(pod("b", "10.0.0.9"))
    assert pod_at(index, "10.0.0.9", 1100.0) == "a"
    assert pod_at(index, "10.0.0.9") == "b"
    clock.now = 1250.0
    index.delete_pod("uid-a")  # late: must not unbind b
    assert pod_at(index, "10.0.0.9") == "b"


def test_deleted_node_address_reused_by_a_pod(index: ClusterIndex, clock: Clock) -> None:
    index.upsert_node(decode_node(make_node("n9", ["10.0.3.3"])))
    clock.now = 1500.0
    index.delete_node("n9")
    assert index.node("n9") is None
    clock.now = 1510.0
    index.upsert_pod(pod("p", "10.0.3.3"))
    found = index.lookup("10.0.3.3", 1400.0)
    assert found is not None and found.is_node
    assert pod_at(index, "10.0.3.3") == "p"


def test_history_is_capped_and_counted(index: ClusterIndex, clock: Clock) -> None:
    for i in range(MAX_SPANS_PER_IP + 3):
        clock.now += 1
        index.upsert_pod(pod(f"p{i}", "10.0.0.1"))
        clock.now += 1
        index.delete_pod(f"uid-p{i}")
    assert index.spans_evicted == 3
    assert pod_at(index, "10.0.0.1") == f"p{MAX_SPANS_PER_IP + 2}"


def test_generation_moves_only_on_changes(index: ClusterIndex) -> None:
    record = pod("a", "10.0.0.5")
    index.upsert_pod(record)
    generation = index.generation
    index.upsert_pod(pod("a", "10.0.0.5"))  # a status-only update
    assert index.generation == generation
    index.upsert_pod(pod("a", "10.0.0.6"))
    assert index.generation > generation
    assert pod_at(index, "10.0.0.6") == "a"
    assert pod_at(index, "10.0.0.5") == "a"  # released, in grace


def test_replace_releases_what_is_missing(index: ClusterIndex, clock: Clock) -> None:
    index.replace_pods([pod("a", "10.0.0.1"), pod("b", "10.0.0.2")])
    clock.now = 5000.0
    index.replace_pods([pod("b", "10.0.0.2"), pod("c", "10.0.0.3")])
    assert index.pod_count == 2
    assert pod_at(index, "10.0.0.1", 4000.0) == "a"
    assert index.lookup("10.0.0.1", 5000.0 + 301.0) is None
    index.replace_nodes([decode_node(make_node("n1", ["10.1.0.1"]))])
    index.replace_nodes([])
    assert index.node_count == 0 and index.node("n1") is None


def test_unknown_address(index: ClusterIndex) -> None:
    assert index.lookup("203.0.113.9") is None
    assert index.lookup("not-an-ip") is None


def test_caps_refuse_new_objects_counted(clock: Clock) -> None:
    idx = ClusterIndex(clock=clock, max_pods=2, max_nodes=1)
    idx.register_source("t")
    idx.mark_synced("t")
    for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")):
        idx.upsert_pod(pod(name, ip))
    idx.upsert_pod(pod("a", "10.0.0.9"))  # an existing pod still updates
    idx.upsert_node(decode_node(make_node("n1", ["10.1.0.1"])))
    idx.upsert_node(decode_node(make_node("n2", ["10.1.0.2"])))
    assert idx.objects_dropped == 2
    assert idx.pod_count == 2 and idx.node_count == 1
    assert idx.lookup("10.0.0.3") is None  # unknown, not wrong
    assert pod_at(idx, "10.0.0.9") == "a"
