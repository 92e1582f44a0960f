"""Real node names: EKS names its nodes `ip-10-0-1-2.eu-west-1.compute.internal` (dots), and the whole
chain must work with them exactly as with GKE's dotless names: pins, the agents' node-scoped watches
through the RBAC-enforcing API server (`spec.nodeName=` / `metadata.name=` field selectors), the enricher."""

from __future__ import annotations

from pathlib import Path

import pytest

from otel_kzt.demo.runner import RunConfig
from otel_kzt.demo.traffic import Engine
from otel_kzt.demo.workloads import Listener
from tests.e2e import truth
from tests.e2e.conftest import AGGREGATION, GRPC_PORT, TEST_PORT, E2ERun, Slot, run_exchanges, wait_exact

pytestmark = pytest.mark.kernel


def test_eks_dotted_node_names(slot: Slot, tmp_path: Path) -> None:
    prefix, net_id, metrics_port = slot.eks
    run = E2ERun(RunConfig(prefix=prefix, net_id=net_id, zones=2, nodes_per_zone=1, interval_s=1.0,
                               grpc_port=GRPC_PORT, metrics_port=metrics_port, style="eks", workdir=tmp_path,
                               # addresses in the series, as in the e2e bed: wait_exact keys on them
                               enricher_args=("--flow-aggregation", ",".join(AGGREGATION),
                                              "--no-flow-logs-stdout")))
    engine = None
    try:
        assert "." in run.cluster.nodes[0].name
        run.start(traffic=False, ready_timeout_s=60)
        truth.install(run.cluster)
        pods = run.cluster.routed_pods()
        engine = Engine(tuple(Listener(p.netns, TEST_PORT, p.name) for p in pods), ())
        engine.start()
        run_exchanges([(a.netns, b.v4, 500, 20_000) for a in pods for b in pods if a is not b])
        wait_exact(run)
    finally:
        if engine is not None:
            engine.stop()
        run.close()
