"""Scale-out: a replica restarted and back must not make the sum over replicas overcount.

Three agents (the agent's real loop, naming and exporter over real gRPC, fed by a fake datapath) list two
`otel-kzt enricher` replicas; every request is also copied to a third enricher, the one-replica reference.
The replica serving the most agents is stopped; its agents fail over to the survivor. It is started again
on the same port and left running well past the agents' `down_s`. An agent that went back to its first
choice would leave its totals on the survivor (kept until the series TTL) and bring them all again to the
restarted replica: the sum over replicas showed +22 % / +44 % with the old, returning choice. With the
sticky choice the agents stay on the survivor, and the sum over replicas equals the reference and the
ground truth exactly. The replicas' `/metrics` are read directly (no Prometheus needed for a sum).

Then the agents' side: after that failover every agent is restarted (an upgrade: a new exporter, the same
receiver store and the same cumulative counters, as the pinned map and datapath hand them over) while its
first choice is alive. A new process that started from its first rendezvous choice would move back and
overcount the same way; resuming on the stored receiver, it stays, and the sums are exact again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.agent.state import MemoryReceiverStore
from tests.integration import deploy_agents as da
from tests.integration import deploy_stack as ds
from tests.integration.test_scaleout import _split_ports
from tests.support.k8s_cluster import ENRICHER, ServedCluster

pytestmark = pytest.mark.integration

DOWN_S = 1.0  # the agents' skip of a failed receiver: short, so a returning agent would return quickly
INTERVAL_S = 0.5
FLOW_BYTES = f"{schema.PROM_FLOW_BYTES}_total"


@dataclass
class Bed:
    control: ServedCluster  # the metadata every agent and enricher lists and watches
    ports: list[int]
    home: dict[str, int]  # node -> index of the replica it ranks first
    reference: ds.EnricherProcess
    replicas: list[ds.EnricherProcess]
    agents: list[da.Agent]
    stores: dict[str, MemoryReceiverStore] = field(default_factory=dict)  # node -> its receiver store
    left_behind: int = 0  # bytes agents closed since left with the receiver they moved away from

    def start_agent(self, node: str, datapath: da.FakeDatapath) -> None:
        """An agent process for `node` with its receiver store and `datapath`'s counters (a restart: the
        pinned map and state hand them over)."""
        self.agents.append(
            da.start_agent(
                node,
                [r.otlp_url for r in self.replicas],
                self.control,
                interval_s=INTERVAL_S,
                reference=self.reference.otlp_url,
                down_s=DOWN_S,
                datapath=datapath,
                store=self.stores[node],
            )
        )


def _enricher(control: ServedCluster, name: str, grpc_port: int | None = None) -> ds.EnricherProcess:
    """A replica (or the reference), its metadata from `control` with the enricher's own token."""
    return ds.EnricherProcess(control.workdir, control.args(ENRICHER), name, grpc_port=grpc_port)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    """Three agents with receiver stores (`bed.stores`), two replicas, the reference; all stopped after."""
    with da.served(tmp_path) as control:
        processes: list[ds.EnricherProcess] = []
        bed: Bed | None = None
        try:
            reference = _enricher(control, "ks-reference")
            processes.append(reference)
            ports, home = _split_ports()
            replicas = [_enricher(control, f"ks-r{i}", p) for i, p in enumerate(ports)]
            processes.extend(replicas)
            for enricher in processes:
                enricher.wait_ready()
            bed = Bed(control, ports, home, reference, replicas, [])
            for node in da.NODES:
                bed.stores[node] = MemoryReceiverStore()
                bed.start_agent(node, da.FakeDatapath(node, da.flows_begin_ns()))
            yield bed
        finally:
            for agent in bed.agents if bed else []:
                agent.close()
            for enricher in {id(p): p for p in [*processes, *(bed.replicas if bed else [])]}.values():
                enricher.stop()


def _samples(enricher: ds.EnricherProcess, name: str) -> list[tuple[dict[str, str], float]]:
    status, body = ds.http_get(f"http://{enricher.metrics_target}/metrics")
    assert status == 200, f"{enricher.name} /metrics: HTTP {status}"
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    ]


def _bytes(enricher: ds.EnricherProcess) -> float:
    return sum(value for _, value in _samples(enricher, FLOW_BYTES))


def _reporting(enricher: ds.EnricherProcess, since_unix_s: float) -> set[str]:
    """Nodes whose last report to `enricher` is newer than `since_unix_s`."""
    label = schema.ENRICHER_AGENT_LAST_REPORT_LABEL
    return {
        labels[label]
        for labels, value in _samples(enricher, schema.ENRICHER_AGENT_LAST_REPORT)
        if value > since_unix_s
    }


def _fail_over_and_back(bed: Bed) -> tuple[ds.EnricherProcess, ds.EnricherProcess]:
    """Stop the replica serving most agents until all report to the survivor, then start it again on
    the same port: returns (survivor, restarted)."""
    started = time.time()
    for i, replica in enumerate(bed.replicas):
        mine = {node for node, home in bed.home.items() if home == i}

        def on_it(r: ds.EnricherProcess = replica, m: set[str] = mine) -> bool:
            return _reporting(r, started) == m

        ds.wait_for(on_it, 20, f"agents on {replica.name}")

    victim = max((0, 1), key=lambda i: list(bed.home.values()).count(i))
    survivor = bed.replicas[1 - victim]
    bed.replicas[victim].stop()
    stopped = time.time()
    ds.wait_for(
        lambda: _reporting(survivor, stopped + INTERVAL_S) == set(da.NODES),
        20,
        "every agent failing over to the survivor",
    )
    restarted = _enricher(bed.control, f"ks-r{victim}-again", bed.ports[victim])
    bed.replicas[victim] = restarted
    restarted.wait_ready()
    return survivor, restarted


def _assert_sums_exact(bed: Bed) -> None:
    """Freeze the counters; the reference and the sum over replicas must both equal the ground truth."""
    for agent in bed.agents:
        agent.datapath.frozen.set()
    truth = sum(b for agent in bed.agents for b, _ in agent.datapath.totals().values())
    ds.wait_for(lambda: _bytes(bed.reference) == truth, 10, f"the reference showing {truth} bytes")
    # What the stopped replica counted before the agents moved is gone with it (restarted without state):
    # the survivor began new runs where it stopped (DESIGN §5.7) and never counts it again.
    left = bed.left_behind + sum(agent.service.left_behind_bytes for agent in bed.agents)
    assert left > 0
    summed = 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and summed + left != truth:  # the replicas get each request after
        time.sleep(INTERVAL_S)
        summed = sum(_bytes(r) for r in bed.replicas)
    assert summed + left == truth, f"replicas sum to {summed:.0f} + {left} left behind, against {truth}"


def test_replica_restarted_and_back_does_not_overcount(bed: Bed) -> None:
    survivor, restarted = _fail_over_and_back(bed)
    back = time.time()
    time.sleep(DOWN_S + 6 * INTERVAL_S)  # a returning agent would be back by now
    _assert_sums_exact(bed)
    assert _reporting(restarted, back) == set(), "an agent moved back to its first choice"
    assert _reporting(survivor, back) == set(da.NODES)


def test_agents_restarted_after_a_failover_stay_on_the_survivor(bed: Bed) -> None:
    survivor, restarted = _fail_over_and_back(bed)
    time.sleep(DOWN_S + 2 * INTERVAL_S)  # the restarted replica is not marked failed any more
    old, bed.agents = bed.agents, []
    upgraded = time.time()
    for agent in old:  # one at a time, as a DaemonSet rolls: final export, then a new process
        agent.close()
        bed.left_behind += agent.service.left_behind_bytes
        bed.start_agent(agent.node, agent.datapath)
    time.sleep(6 * INTERVAL_S)  # a new agent that started from its first choice would be there by now
    assert {a.node for a in bed.agents} == set(da.NODES)
    _assert_sums_exact(bed)
    assert _reporting(restarted, upgraded) == set(), "a restarted agent went back to its first choice"
    assert _reporting(survivor, upgraded) == set(da.NODES)
