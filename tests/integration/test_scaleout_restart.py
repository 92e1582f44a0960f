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

On a loaded machine an answer can come after an agent's timeout (its interval here, 0.5 s): the agent
moves between two live replicas too, and the one it left may or may not have counted what it was last
sent. Every change of receiver is recorded (`MovesStore`), with the bytes its new runs begin from
(`left_behind_bytes`): what a move away from the stopped replica left is gone with it, what a move away
from a live replica left is still in that replica's sum. So the sum over replicas plus what the stopped one
took never exceeds the ground truth (a byte counted twice fails at once), and equals it when no agent moved
between live replicas; the reference, sent everything each main receiver was sent, equals it always.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.agent.state import MemoryReceiverStore, receiver_id
from tests.integration import deploy_agents as da
from tests.integration import deploy_stack as ds
from tests.integration.test_scaleout import _split_ports
from tests.support.k8s_cluster import ENRICHER, ServedCluster

pytestmark = pytest.mark.integration

DOWN_S = 1.0  # the agents' skip of a failed receiver: short, so a returning agent would return quickly
INTERVAL_S = 0.5
FLOW_BYTES = f"{schema.PROM_FLOW_BYTES}_total"


class Change(NamedTuple):
    when: float  # time.time()
    receiver: int  # the receiver the agent writes to from then on (`receiver_id`)
    left: int  # the node's left-behind bytes before this change's new runs


class MovesStore(MemoryReceiverStore):
    """A node's receiver store (kept across its agent processes) that records every change of receiver."""

    def __init__(self, left_now: Callable[[], int]) -> None:
        super().__init__()
        self.left_now = left_now
        self.changes: list[Change] = []

    def save(self, receiver: int) -> None:
        self.changes.append(Change(time.time(), receiver, self.left_now()))
        super().save(receiver)


@dataclass
class Bed:
    control: ServedCluster  # the metadata every agent and enricher lists and watches
    ports: list[int]
    home: dict[str, int]  # node -> index of the replica it ranks first
    reference: ds.EnricherProcess
    replicas: list[ds.EnricherProcess]
    agents: list[da.Agent]
    stores: dict[str, MovesStore] = field(default_factory=dict)  # node -> its receiver store
    closed_left: dict[str, int] = field(default_factory=dict)  # node -> its closed agents' left-behind bytes
    victim: int = 0  # receiver id of the replica stopped (and later started again on the same address)
    restarted_at: float = 0.0  # time.time() when it was started again

    def left_now(self, node: str) -> int:
        """Bytes the node's agents (closed and running) left with receivers they moved away from."""
        running = next((a for a in reversed(self.agents) if a.node == node), None)
        return self.closed_left.get(node, 0) + (running.service.left_behind_bytes if running else 0)

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
                bed.stores[node] = MovesStore(partial(bed.left_now, node))
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


def _on_their_first_choices(bed: Bed) -> int:
    """Wait until every agent reports to the replica it ranks first; returns the index of the replica
    serving most agents."""
    started = time.time()
    for i, replica in enumerate(bed.replicas):
        mine = {node for node, home in bed.home.items() if home == i}

        def on_it(r: ds.EnricherProcess = replica, m: set[str] = mine) -> bool:
            return _reporting(r, started) == m

        ds.wait_for(on_it, 20, f"agents on {replica.name}")
    return max((0, 1), key=lambda i: list(bed.home.values()).count(i))


def _fail_over_and_back(bed: Bed) -> tuple[ds.EnricherProcess, ds.EnricherProcess]:
    """Stop the replica serving most agents until all report to the survivor, then start it again on
    the same port: returns (survivor, restarted)."""
    victim = _on_their_first_choices(bed)
    survivor = bed.replicas[1 - victim]
    bed.victim = receiver_id(bed.replicas[victim].otlp_url)
    bed.replicas[victim].stop()
    stopped = time.time()
    ds.wait_for(
        lambda: _reporting(survivor, stopped + INTERVAL_S) == set(da.NODES),
        20,
        "every agent failing over to the survivor",
    )
    bed.restarted_at = time.time()
    restarted = _enricher(bed.control, f"ks-r{victim}-again", bed.ports[victim])
    bed.replicas[victim] = restarted
    restarted.wait_ready()
    return survivor, restarted


def _left_behind(bed: Bed) -> tuple[int, set[str]]:
    """(bytes left with the stopped replica, nodes that moved between live replicas). A move away from the
    stopped replica's address before it was started again left its bytes with the stopped process; any
    other move left them with a live replica, which still counts them. A node whose first receiver was not
    its first choice moved before any record: it counts as having moved between live ones."""
    dead, live = 0, set()
    for node, store in bed.stores.items():
        changes = store.changes
        if not changes or changes[0].receiver != receiver_id(_url(bed, bed.home[node])):
            live.add(node)
        after = [c.left for c in changes[2:]] + [bed.left_now(node)]  # each move's left, once it was made
        for before, move, left in zip(changes, changes[1:], after, strict=False):
            if before.receiver == bed.victim and move.when < bed.restarted_at:
                dead += left - move.left
            else:
                live.add(node)
    return dead, live


def _url(bed: Bed, index: int) -> str:
    return f"http://{ds.LOCALHOST}:{bed.ports[index]}"


def _assert_sums(bed: Bed) -> tuple[int, set[str]]:
    """Freeze the counters. The reference equals the ground truth; the sum over replicas plus what the
    stopped replica took never exceeds it, and equals it when no agent moved between live replicas.
    Returns (the bytes the stopped replica took, the nodes that moved between live replicas)."""
    for agent in bed.agents:
        agent.datapath.frozen.set()
    truth = sum(b for agent in bed.agents for b, _ in agent.datapath.totals().values())
    reference, deadline = 0.0, time.monotonic() + 10
    while reference != truth and time.monotonic() < deadline:
        reference = _bytes(bed.reference)
        time.sleep(0.0 if reference == truth else 0.2)
    assert reference == truth, f"the reference shows {reference:.0f} bytes, against {truth}"
    # What the stopped replica counted before the agents moved is gone with it (restarted without state):
    # the survivor began new runs where it stopped (DESIGN §5.7) and never counts it again.
    dead, live = _left_behind(bed)
    summed = 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and summed + dead != truth:  # the replicas get each request after
        time.sleep(INTERVAL_S)
        summed = sum(_bytes(r) for r in bed.replicas)
    said = f"replicas sum to {summed:.0f} + {dead} left with the stopped one, against {truth}"
    moves = {node: [c.receiver for c in store.changes] for node, store in bed.stores.items()}
    assert summed + dead <= truth, f"counted twice: {said}; moves {moves}"
    if not live:
        assert summed + dead == truth, f"{said}; moves {moves}"
    return dead, live


def test_replica_restarted_and_back_does_not_overcount(bed: Bed) -> None:
    survivor, restarted = _fail_over_and_back(bed)
    back = time.time()
    time.sleep(DOWN_S + 6 * INTERVAL_S)  # a returning agent would be back by now
    dead, live = _assert_sums(bed)  # live: nodes that moved between live replicas (a late answer)
    assert dead > 0
    assert _reporting(restarted, back) <= live, "an agent moved back to its first choice"
    assert set(da.NODES) - live <= _reporting(survivor, back)


def test_agents_restarted_after_a_failover_stay_on_the_survivor(bed: Bed) -> None:
    survivor, restarted = _fail_over_and_back(bed)
    time.sleep(DOWN_S + 2 * INTERVAL_S)  # the restarted replica is not marked failed any more
    upgraded = time.time()
    for agent in list(bed.agents):  # one at a time, as a DaemonSet rolls: final export, then a new process
        agent.close()
        bed.closed_left[agent.node] = bed.left_now(agent.node)
        bed.agents.remove(agent)
        bed.start_agent(agent.node, agent.datapath)
    time.sleep(6 * INTERVAL_S)  # a new agent that started from its first choice would be there by now
    assert {a.node for a in bed.agents} == set(da.NODES)
    dead, live = _assert_sums(bed)
    assert dead > 0
    assert _reporting(restarted, upgraded) <= live, "a restarted agent went back to its first choice"
    assert set(da.NODES) - live <= _reporting(survivor, upgraded)


def test_a_replica_paused_past_the_agents_timeout_counts_nothing_twice(bed: Bed) -> None:
    """A replica overloaded for a moment (SIGSTOP, then SIGCONT: past the agents' timeout, the interval):
    its agents move to the other, live replica; what it took before they timed out and counts once it
    runs again is not counted there too (DESIGN §5.7). Before, the new runs began at the values it had
    last confirmed, and an answer that came too late was counted twice."""
    paused = bed.replicas[_on_their_first_choices(bed)]
    other = next(r for r in bed.replicas if r is not paused)
    os.kill(paused.proc.pid, signal.SIGSTOP)
    try:
        stopped = time.time()
        ds.wait_for(
            lambda: _reporting(other, stopped + INTERVAL_S) == set(da.NODES),
            20,
            "every agent moving to the live replica",
        )
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    time.sleep(4 * INTERVAL_S)  # the paused one answers (or drops) what it took meanwhile
    dead, live = _assert_sums(bed)
    moved = {node for node, home in bed.home.items() if bed.replicas[home] is paused}
    assert (dead, moved <= live) == (0, True), f"left with a stopped replica {dead}, moved {live}"
