"""Scale-out: a replica restarted and back must not make the sum over replicas overcount.

Three agents (the agent's real loop, naming and exporter over real gRPC, fed by a fake datapath) list two
`otel-kzt enricher` replicas; every request is also copied to a third enricher, the one-replica reference.
The replica serving the most agents is stopped; its agents fail over to the survivor. It is started again
on the same port and left running well past the agents' `down_s`. An agent that went back to its first
choice would leave its totals on the survivor (kept until the series TTL) and bring them all again to the
restarted replica: the sum over replicas showed +22 % / +44 % with the old, returning choice. With the
sticky choice the agents stay on the survivor, and the sum over replicas equals the reference and the
ground truth exactly. The replicas' `/metrics` are read directly (no Prometheus needed for a sum).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from tests.integration import deploy_agents as da
from tests.integration import deploy_stack as ds
from tests.integration.test_scaleout import _split_ports

pytestmark = pytest.mark.integration

DOWN_S = 1.0  # the agents' skip of a failed receiver: short, so a returning agent would return quickly
INTERVAL_S = 0.5
FLOW_BYTES = f"{schema.PROM_FLOW_BYTES}_total"


@dataclass
class Bed:
    tmp: Path
    metadata: Path
    ports: list[int]
    home: dict[str, int]  # node -> index of the replica it ranks first
    reference: ds.EnricherProcess
    replicas: list[ds.EnricherProcess]
    agents: list[da.Agent]


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    metadata = da.write_metadata(tmp_path / "ka-metadata.json")
    processes: list[ds.EnricherProcess] = []
    agents: list[da.Agent] = []
    try:
        reference = ds.EnricherProcess(tmp_path, metadata, "ka-reference")
        processes.append(reference)
        ports, home = _split_ports()
        replicas = [
            ds.EnricherProcess(tmp_path, metadata, f"ka-r{i}", grpc_port=p) for i, p in enumerate(ports)
        ]
        processes.extend(replicas)
        for enricher in processes:
            enricher.wait_ready()
        urls = [r.otlp_url for r in replicas]
        for node in da.NODES:
            agents.append(
                da.start_agent(
                    node, urls, metadata, interval_s=INTERVAL_S, reference=reference.otlp_url, down_s=DOWN_S
                )
            )
        bed = Bed(tmp_path, metadata, ports, home, reference, replicas, agents)
        yield bed
        processes.extend(bed.replicas)  # the restarted replica too
    finally:
        for agent in agents:
            agent.close()
        for enricher in processes:
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


def test_replica_restarted_and_back_does_not_overcount(bed: Bed) -> None:
    started = time.time()
    for i, replica in enumerate(bed.replicas):
        mine = {node for node, home in bed.home.items() if home == i}
        ds.wait_for(lambda r=replica, m=mine: _reporting(r, started) == m, 20, f"agents on {replica.name}")

    victim = max((0, 1), key=lambda i: list(bed.home.values()).count(i))
    survivor = bed.replicas[1 - victim]
    bed.replicas[victim].stop()
    stopped = time.time()
    ds.wait_for(
        lambda: _reporting(survivor, stopped + INTERVAL_S) == set(da.NODES),
        20,
        "every agent failing over to the survivor",
    )
    restarted = ds.EnricherProcess(bed.tmp, bed.metadata, f"ka-r{victim}-again", grpc_port=bed.ports[victim])
    bed.replicas[victim] = restarted
    restarted.wait_ready()
    back = time.time()
    time.sleep(DOWN_S + 6 * INTERVAL_S)  # a returning agent would be back by now

    for agent in bed.agents:
        agent.datapath.frozen.set()
    truth = sum(b for agent in bed.agents for b, _ in agent.datapath.totals().values())
    ds.wait_for(lambda: _bytes(bed.reference) == truth, 10, f"the reference showing {truth} bytes")
    summed = 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and summed != truth:  # the replicas get each request just after
        time.sleep(INTERVAL_S)
        summed = sum(_bytes(r) for r in bed.replicas)
    assert summed == truth, f"replicas sum to {summed:.0f} bytes, {summed / truth - 1:+.1%} against {truth}"
    assert _reporting(restarted, back) == set(), "an agent moved back to its first choice"
    assert _reporting(survivor, back) == set(da.NODES)
