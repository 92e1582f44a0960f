"""DESIGN §5.7 end to end: a pod replaced, after a quiet moment, by a new pod with the same IP on the same
node (the kernel's flow key survives: same addresses, same server port). The old pod keeps what it sent,
the new one is credited from the rename on, and no byte is counted twice."""

from __future__ import annotations

import dataclasses
import time

import pytest

from otel_kzt import schema
from otel_kzt.demo.workloads import add_deployment_pod
from tests.e2e import truth
from tests.e2e.conftest import E2ERun, L, enricher_series, run_exchanges, wait_exact

pytestmark = pytest.mark.kernel

QUIET_S = 3.0  # a few export intervals without traffic; well under the idle timeout (the key survives)


def _bytes_by_pod(run: E2ERun, pair: truth.Pair, label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, labels, value in enricher_series(run):
        if key == pair:
            name = labels.get(L(label), "")
            out[name] = out.get(name, 0) + int(value)
    return out


def test_pod_replaced_by_a_pod_with_the_same_ip(e2e: E2ERun) -> None:
    cluster = e2e.cluster
    old = next(p for p in cluster.routed_pods() if p.workload_name == "payments")
    peer = next(p for p in cluster.routed_pods() if p.workload_name == "postgres")
    assert peer.node.name != old.node.name
    sent, answered = (old.v4, peer.v4, "tcp"), (peer.v4, old.v4, "tcp")
    run_exchanges([(old.netns, peer.v4, 1_200, 24_000 + k) for k in range(4)])
    before, _rows = wait_exact(e2e)

    time.sleep(QUIET_S)
    # The Deployment's new pod: a new name and uid, the same node, the same IP (the CNI handed it on).
    fresh = add_deployment_pod(cluster, old.namespace, old.workload_name, old.node, replica=7,
                               ports=old.ports)
    cluster.pods.remove(fresh)
    new = dataclasses.replace(fresh, netns=old.netns, v4=old.v4, v6=old.v6)
    cluster.pods[cluster.pods.index(old)] = new
    e2e.write_metadata()  # the API server: DELETED old, ADDED new, as the kubelet and scheduler make it
    time.sleep(QUIET_S)  # the agent's watch sees it before the new pod sends

    run_exchanges([(new.netns, peer.v4, 1_500, 31_000 + k) for k in range(3)])
    after, _rows = wait_exact(e2e)
    assert after[sent] > before[sent] and after[answered] > before[answered]
    assert _bytes_by_pod(e2e, sent, schema.SOURCE_POD_NAME) == {
        old.name: before[sent], new.name: after[sent] - before[sent]}
    assert _bytes_by_pod(e2e, answered, schema.DESTINATION_POD_NAME) == {
        old.name: before[answered], new.name: after[answered] - before[answered]}
