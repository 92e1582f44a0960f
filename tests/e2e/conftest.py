"""The end-to-end bed: the demo's cluster (2 zones x 2 nodes) with real agents and a real enricher.

One session-wide run (agents compile their eBPF program once); traffic is bounded and driven by the tests,
ground truth is counted by nftables at the senders (truth.py). Everything is removed at the end, also on
failure.

Two test sessions on one machine (two engineers, or CI next to a developer) must not collide, so each
session first takes a free *slot* (an flock under /run) that decides its names, address plans and ports:
slot N uses namespaces `kzN-*` / `kzcN-*` / `kzeN-*`, net ids 202+2N / 203+2N / 220+N, /metrics ports
29464+N / 29470+N / 29480+N. With every slot taken, a session waits for one.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from otel_kzt import schema
from otel_kzt.demo.cluster import Cluster, NodeSpec, PodSpec
from otel_kzt.demo.runner import LOCK_DIR, ClusterRun, DemoBusy, RunConfig, RunLock
from otel_kzt.demo.traffic import Engine, exchange
from otel_kzt.demo.view import FLOW_BYTES, parse
from otel_kzt.demo.workloads import Listener
from tests.conftest import kernel_unavailable_reason
from tests.e2e import truth

SLOTS = 4
SLOT_WAIT_S = 600.0
GRPC_PORT = 24317  # bound on each slot's own fabric address, so slots share the number
TEST_PORT = 24080  # every pod, node and the internet host listen here during the tests
EXACT_TIMEOUT_S = 30.0
AGGREGATION = (
    schema.SOURCE_ADDRESS, schema.DESTINATION_ADDRESS, schema.NETWORK_TYPE, schema.NETWORK_TRANSPORT,
    schema.TRAFFIC_CLASS, schema.SOURCE_POD_NAME, schema.SOURCE_NODE_NAME, schema.SOURCE_WORKLOAD_KIND,
    schema.SOURCE_WORKLOAD_NAME, schema.DESTINATION_POD_NAME, schema.DESTINATION_WORKLOAD_KIND,
    schema.DESTINATION_WORKLOAD_NAME,
)
L = schema.prom_label


@dataclass(frozen=True)
class Row:
    """One address pair in the enricher's /metrics: bytes and the labels it was given."""

    bytes: float
    labels: dict[str, str]


@dataclass(frozen=True)
class Slot:
    index: int

    @property
    def bed(self) -> tuple[str, int, int]:
        """(prefix, net id, /metrics port) of the session's cluster."""
        return f"kz{self.index}", 202 + 2 * self.index, 29464 + self.index

    @property
    def demo(self) -> tuple[str, int, int]:
        """(prefix, net id, /metrics port) of the demos the CLI tests start."""
        return f"kzc{self.index}", 203 + 2 * self.index, 29470 + self.index

    @property
    def eks(self) -> tuple[str, int, int]:
        """(prefix, net id, /metrics port) of the EKS-named cluster test."""
        return f"kze{self.index}", 220 + self.index, 29480 + self.index


@pytest.fixture(scope="session")
def slot() -> Iterator[Slot]:
    if kernel_unavailable_reason() is not None:
        pytest.skip(kernel_unavailable_reason() or "")  # the kernel marker decides skip vs fail first
    deadline = time.monotonic() + SLOT_WAIT_S
    while True:
        for index in range(SLOTS):
            lock = RunLock(LOCK_DIR / f"otel-kzt-e2e-slot-{index}.lock")
            try:
                lock.acquire()
            except DemoBusy:
                continue
            try:
                yield Slot(index)
            finally:
                lock.release()
            return
        if time.monotonic() > deadline:
            pytest.fail(f"all {SLOTS} end-to-end slots stayed busy for {SLOT_WAIT_S:.0f}s")
        time.sleep(1.0)


@pytest.fixture(scope="session")
def e2e(slot: Slot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterRun]:
    prefix, net_id, metrics_port = slot.bed
    workdir = Path(tmp_path_factory.mktemp("e2e"))
    # A state file: an enricher restarted without one treats the runs it meets as baselines (DESIGN §4)
    enricher_args = ("--flow-aggregation", ",".join(AGGREGATION), "--no-flow-logs-stdout",
                     "--state-file", str(workdir / "enricher-state.json.gz"), "--checkpoint-interval", "1s")
    cfg = RunConfig(prefix=prefix, net_id=net_id, zones=2, nodes_per_zone=2, interval_s=1.0,
                    grpc_port=GRPC_PORT, metrics_port=metrics_port, enricher_args=enricher_args,
                    workdir=workdir)
    run = ClusterRun(cfg)
    engine: Engine | None = None
    try:
        run.start(traffic=False)
        truth.install(run.cluster)
        listeners = [Listener(p.netns, TEST_PORT, p.name) for p in run.cluster.routed_pods()]
        listeners += [Listener(n.netns, TEST_PORT, n.name) for n in run.cluster.nodes]
        listeners.append(Listener(run.cluster.internet_netns, TEST_PORT, "internet"))
        engine = Engine(tuple(listeners), ())
        engine.start()
        yield run
    finally:
        if engine is not None:
            engine.stop()
        run.close()


def owner_node(cluster: Cluster, address: str) -> NodeSpec | None:
    owner = cluster.owner_of(address)
    return owner.node if isinstance(owner, PodSpec) else owner


def expected_class(cluster: Cluster, src: str, dst: str) -> str:
    """The traffic class from the cluster model alone (not from the enricher's logic)."""
    a, b = owner_node(cluster, src), owner_node(cluster, dst)
    if a is None or b is None:
        return schema.TrafficClass.EXTERNAL.value
    if a.name == b.name:
        return schema.TrafficClass.SAME_NODE.value
    return (schema.TrafficClass.SAME_ZONE if a.zone == b.zone else schema.TrafficClass.CROSS_ZONE).value


def enricher_rows(run: ClusterRun) -> dict[truth.Pair, Row]:
    scrape = parse(run.scrape(), time.monotonic())
    rows: dict[truth.Pair, Row] = {}
    for labels, value in scrape.samples.get(FLOW_BYTES, []):
        key = (str(ipaddress.ip_address(labels[L(schema.SOURCE_ADDRESS)])),
               str(ipaddress.ip_address(labels[L(schema.DESTINATION_ADDRESS)])),
               labels.get(L(schema.NETWORK_TRANSPORT), ""))
        previous = rows.get(key)
        rows[key] = Row(value + (previous.bytes if previous else 0.0), labels)
    return rows


def in_scope(cluster: Cluster, pair: truth.Pair) -> bool:
    """TCP sent by a pod or a node of the cluster, except the agents' own OTLP to the host.

    Also out of scope: a pod talking to its own node's address. Such packets are delivered to the node,
    never cross its POSTROUTING hook, so the datapath cannot see them (DESIGN §2: one hook, POSTROUTING);
    they are same-node traffic, which no provider bills.
    """
    src, dst, proto = pair
    if proto != "tcp" or dst in {cluster.plan.host(4), cluster.plan.host(6)}:
        return False
    src_owner = cluster.owner_of(src)
    if src_owner is None:
        return False
    return not (isinstance(src_owner, PodSpec) and dst in src_owner.node.addresses)


def wait_exact(run: ClusterRun, timeout_s: float = EXACT_TIMEOUT_S) -> tuple[dict[truth.Pair, int],
                                                                            dict[truth.Pair, Row]]:
    """Poll until the enricher's bytes equal the ground truth for every pair in scope; fail with the diff."""
    deadline = time.monotonic() + timeout_s
    while True:
        want = {k: v for k, v in truth.read(run.cluster).items() if in_scope(run.cluster, k)}
        rows = enricher_rows(run)
        got = {k: int(r.bytes) for k, r in rows.items() if in_scope(run.cluster, k)}
        if want == got:
            return want, rows
        if time.monotonic() > deadline:
            diff = {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got))
                    if want.get(k) != got.get(k)}
            pytest.fail(f"enricher bytes differ from nftables ground truth (pair: (truth, enricher)): {diff}")
        time.sleep(0.5)


def run_exchanges(jobs: list[tuple[str, str, int, int]], workers: int = 16) -> None:
    """(client netns, server address, request bytes, response bytes) each as one bounded connection."""
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(exchange, ns, addr, TEST_PORT, request_bytes=req, response_bytes=resp)
                   for ns, addr, req, resp in jobs]
        for future in futures:
            future.result()
