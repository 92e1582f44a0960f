"""Scale-out: two enricher replicas give the same Prometheus answers as one, also when one is stopped.

Three agents (the agent's real interval loop, naming, metadata and exporter, over real gRPC, fed by a fake
datapath: deploy_agents.py says why) list both replicas as `--otlp-endpoint`; each picks one by rendezvous
hashing of its node name (single writer per series) and fails over to the other when its replica goes away.
Every request an agent sends is also sent, byte for byte, to a third enricher: the one-replica reference.
Prometheus scrapes all three; the sum over the two replicas must equal the reference for every exposed counter
family, and the bytes must equal the fake datapath's ground truth: first with both replicas up, then after one
is stopped mid-run while traffic keeps growing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otel_kzt import schema
from otel_kzt.agent.export import expand, rendezvous_rank, resolve
from tests.integration import deploy_agents as da
from tests.integration import deploy_stack as ds
from tests.support.k8s_cluster import ENRICHER, ServedCluster

pytestmark = pytest.mark.integration

REPLICAS = 'job="otel-kzt-enricher"'
REFERENCE = 'job="reference"'
FAMILIES = [
    f"{schema.PROM_FLOW_BYTES}_total",
    f"{schema.PROM_FLOW_PACKETS}_total",
    f"{schema.PROM_ZONE_TRAFFIC_BYTES}_total",
    f"{schema.PROM_ESTIMATED_COST}_total",
    f"{schema.PROM_POD_CROSS_ZONE_BYTES}_total",
]


@dataclass
class Bed:
    prometheus: ds.PrometheusProcess
    replicas: list[ds.EnricherProcess]
    agents: list[da.Agent]
    home: dict[str, int]  # node -> index of the replica it picks first


def _preferred(node: str, urls: list[str]) -> str:
    return rendezvous_rank(node, expand(urls, False, resolve))[0].url


def _split_ports() -> tuple[list[int], dict[str, int]]:
    """Two gRPC ports such that the three agents do not all pick the same replica."""
    for _ in range(50):
        ports = [ds.free_port(), ds.free_port()]
        urls = [f"http://{ds.LOCALHOST}:{p}" for p in ports]
        home = {node: urls.index(_preferred(node, urls)) for node in da.NODES}
        if len(set(home.values())) == 2 and ports[0] != ports[1]:
            return ports, home
    raise AssertionError("no port pair splits the agents")


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    with da.served(tmp_path) as control:
        yield from _bed(tmp_path, control)


def _bed(tmp_path: Path, control: ServedCluster) -> Iterator[Bed]:
    metadata = control.args(ENRICHER)
    closers: list[object] = []
    try:
        reference = ds.EnricherProcess(tmp_path, metadata, "kx-reference")
        closers.append(reference.stop)
        ports, home = _split_ports()
        replicas = [
            ds.EnricherProcess(tmp_path, metadata, f"kx-r{i}", grpc_port=p) for i, p in enumerate(ports)
        ]
        closers.extend(r.stop for r in replicas)
        for enricher in (reference, *replicas):
            enricher.wait_ready()
        prometheus = ds.PrometheusProcess(
            tmp_path,
            {
                "otel-kzt-enricher": [r.metrics_target for r in replicas],
                "reference": [reference.metrics_target],
            },
        )
        closers.append(prometheus.stop)
        urls = [r.otlp_url for r in replicas]
        agents = [da.start_agent(node, urls, control, reference=reference.otlp_url) for node in da.NODES]
        closers.extend(a.close for a in agents)
        yield Bed(prometheus, replicas, agents, home)
    finally:
        for close in reversed(closers):
            close()  # type: ignore[operator]


def _by_labels(prometheus: ds.PrometheusProcess, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in prometheus.query(expr)}


def _ground_truth_bytes(bed: Bed) -> int:
    return sum(b for agent in bed.agents for b, _ in agent.datapath.totals().values())


def _freeze_and_settle(bed: Bed) -> int:
    """Stop the traffic, wait until the replicas' sum in Prometheus shows the final total; return it.

    The replicas up now sum to it less what a stopped replica counted before its agents moved: they begin
    new runs where it stopped (DESIGN §5.7), so the survivor never counts it again."""
    for agent in bed.agents:
        agent.datapath.frozen.set()
    truth = _ground_truth_bytes(bed)
    left = sum(agent.service.left_behind_bytes for agent in bed.agents)
    query = f"sum({schema.PROM_FLOW_BYTES}_total{{{REPLICAS}}})"

    def settled() -> bool:
        replicas = bed.prometheus.query(query)
        reference = bed.prometheus.query(f"sum({schema.PROM_FLOW_BYTES}_total{{{REFERENCE}}})")
        return (
            bool(replicas and reference)
            and float(replicas[0]["value"][1]) + left == float(reference[0]["value"][1]) == truth
        )

    ds.wait_for(settled, 20, f"replicas (+{left} left behind) and reference to show the ground truth {truth}")
    return truth


def _assert_replicas_equal_reference(bed: Bed) -> None:
    for family in FAMILIES:
        replicas = _by_labels(bed.prometheus, f"sum without (instance, job) ({family}{{{REPLICAS}}})")
        reference = _by_labels(bed.prometheus, f"sum without (instance, job) ({family}{{{REFERENCE}}})")
        assert replicas.keys() == reference.keys(), family
        for labels, value in reference.items():
            assert math.isclose(replicas[labels], value, rel_tol=1e-9), (
                family,
                labels,
                replicas[labels],
                value,
            )


def _heard(bed: Bed, since_unix: float = 0.0) -> dict[str, set[str]]:
    """node -> the replica instances whose latest report from it is later than `since_unix`, from every
    sample Prometheus kept (`last_over_time`): a scrape that timed out on a loaded machine, or a report a
    little late, hides nothing, as a "reported in the last seconds" window would."""
    rows = bed.prometheus.query(f"last_over_time({schema.ENRICHER_AGENT_LAST_REPORT}{{{REPLICAS}}}[1h])")
    out: dict[str, set[str]] = {}
    for r in rows:
        if float(r["value"][1]) > since_unix:
            node = r["metric"][schema.ENRICHER_AGENT_LAST_REPORT_LABEL]
            out.setdefault(node, set()).add(r["metric"]["instance"])
    return out


def test_two_replicas_sum_to_one_and_survive_losing_one(bed: Bed) -> None:
    targets = [r.metrics_target for r in bed.replicas]
    ds.wait_for(lambda: set(_heard(bed)) == set(da.NODES), 20, "every agent reporting")
    # Single writer: each agent has reported to exactly its rendezvous replica, and both replicas are used.
    expected = {node: {targets[i]} for node, i in bed.home.items()}
    assert _heard(bed) == expected

    truth = _freeze_and_settle(bed)
    _assert_replicas_equal_reference(bed)
    assert truth > 0

    # Traffic again; then the replica serving the most agents is stopped mid-run.
    for agent in bed.agents:
        agent.datapath.frozen.clear()
    time.sleep(2)
    victim = max((0, 1), key=lambda i: list(bed.home.values()).count(i))
    stopped_at = time.monotonic()
    bed.replicas[victim].stop()
    stopped_unix = time.time()  # it has exited: no report it took is later
    survivor = targets[1 - victim]
    ds.wait_for(  # every agent has reported to the survivor since, and none to the stopped one
        lambda: _heard(bed, stopped_unix) == {node: {survivor} for node in da.NODES},
        30,
        "every agent failing over to the surviving replica",
    )
    failover_s = time.monotonic() - stopped_at
    ds.wait_for(
        lambda: bool(bed.prometheus.query(f'up{{instance="{targets[victim]}"}} == 0')),
        10,
        "Prometheus to see the stopped replica down",
    )

    final = _freeze_and_settle(bed)
    assert final > truth
    assert sum(agent.service.left_behind_bytes for agent in bed.agents) > 0  # the stopped one's share
    print(f"failover to the surviving replica took {failover_s:.1f}s (agent interval 0.5s)")
