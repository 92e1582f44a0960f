"""The end-to-end bed: the demo's cluster (2 zones x 2 nodes) with real agents and a real enricher.

One session-wide run (agents compile their eBPF program once); traffic is bounded and driven by the tests,
ground truth is counted by nftables at the senders (truth.py). The cluster has what real ones have
(realnet.py: kube-proxy DNAT, an IPVS-style node, NodeLocal DNS, a NodePort), and its components read
metadata through the RBAC-enforcing test API server with their own ServiceAccounts' tokens. Everything is
removed at the end, also on failure.

Two test sessions on one machine (two engineers, or CI next to a developer) must not collide, so each
session first takes a free *slot* (an flock under /run) that decides its names, address plans and ports:
slot N uses namespaces `kzN-*` / `kzcN-*` / `kzeN-*`, net ids 202+2N / 203+2N / 220+N, /metrics ports
29464+N / 29470+N / 29480+N (a second enricher replica: gRPC 24318, /metrics 29490+N). With every slot taken,
a session waits for one.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otel_kzt import schema
from otel_kzt.demo import metadata
from otel_kzt.demo.cluster import Cluster, NodeSpec, PodSpec
from otel_kzt.demo.runner import (
    LOCK_DIR,
    ORPHAN_GUARD,
    ClusterRun,
    DemoBusy,
    RunConfig,
    RunLock,
    stop_process,
)
from otel_kzt.demo.traffic import Engine, exchange, request, run_in_netns
from otel_kzt.demo.view import FLOW_BYTES, parse
from otel_kzt.demo.workloads import Listener
from tests.conftest import kernel_unavailable_reason
from tests.e2e import realnet, truth
from tests.e2e.dns import DnsServer
from tests.support.k8s_cluster import AGENT, ENRICHER, ServedCluster

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
    """One address pair in the enricher's /metrics: bytes and the labels it was given (`labels`: its last
    series'; `named`: every series', so one misnamed series cannot hide behind the others)."""

    bytes: float
    labels: dict[str, str]
    named: tuple[dict[str, str], ...] = ()


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
    def replica(self) -> tuple[int, int]:
        """(gRPC port, /metrics port) of the bed's second enricher replica (the scale-out test's)."""
        return GRPC_PORT + 1, 29490 + self.index

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


class E2ERun(ClusterRun):
    """The demo's run with what real clusters add (realnet.py), its metadata served by the RBAC-enforcing
    test API server: agents and enricher read it with their own ServiceAccounts' tokens (deploy/rbac.yaml),
    as in a cluster, instead of the demo's metadata file."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.real = realnet.plan(self.cluster, TEST_PORT)
        for spec in self.real.services:
            self.services[(spec.namespace, spec.name)] = spec
        self.control: ServedCluster | None = None
        self.endpoints: dict[str, str] = {}  # node name -> its agent's --otlp-endpoint, when not the default
        self.replicas: list[str] = []  # /metrics URLs of further enricher replicas (summed with the first)

    def service_objects(self) -> list[dict[str, Any]]:
        return [realnet.service_object(self.real, o) for o in super().service_objects()]

    def write_metadata(self) -> None:
        """Serve the cluster's objects as they are now. The first call comes from `start()` right after the
        topology exists: the API server (on the host's fabric address, which node namespaces reach) and the
        real-cluster shapes are set up then, before any agent starts."""
        super().write_metadata()
        if self.control is None:
            self.control = ServedCluster(self.workdir, host=self.cluster.plan.host(4)).start()
            self._topo.on_close("test API server", self.control.stop)
            realnet.install(self.cluster, self.real, self.service_objects())
        self.control.sync(metadata.cluster_list(self.cluster)["items"] + self.service_objects())

    def _metadata_args(self, argv: list[str], account: tuple[str, str]) -> list[str]:
        assert self.control is not None, "metadata is written (and served) before any component starts"
        at = argv.index("--kube-metadata")
        return [*argv[:at], *self.control.args(account), *argv[at + 2:]]

    def agent_argv(self, node: NodeSpec) -> list[str]:
        argv = self._metadata_args(super().agent_argv(node), AGENT)
        if node.name in self.endpoints:
            argv[argv.index("--otlp-endpoint") + 1] = self.endpoints[node.name]
        return argv

    def enricher_argv(self) -> list[str]:
        return self._metadata_args(super().enricher_argv(), ENRICHER)

    def start_replica(self, grpc_port: int, metrics_port: int) -> str:
        """Another enricher replica (own ports, own state file) on the same metadata; its /metrics URL,
        from now on summed with the first replica's by `scrapes()`. Stopped with the run."""
        argv = self.enricher_argv()
        argv[argv.index("--grpc-endpoint") + 1] = f"{self.cluster.plan.host(4)}:{grpc_port}"
        argv[argv.index("--metrics-endpoint") + 1] = f"127.0.0.1:{metrics_port}"
        argv[argv.index("--state-file") + 1] = str(self.workdir / f"enricher-{grpc_port}-state.json.gz")
        proc = subprocess.Popen([*ORPHAN_GUARD, *argv], stdout=self._log_file(f"enricher-{grpc_port}"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self._topo.on_close(f"enricher replica {grpc_port}", lambda: stop_process(proc))
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.replicas.append(url)
        return f"http://{self.cluster.plan.host(4)}:{grpc_port}"

    def scrapes(self) -> list[str]:
        """Every enricher replica's /metrics."""
        out = [self.scrape()]
        for url in self.replicas:
            with urllib.request.urlopen(url, timeout=5) as resp:
                out.append(resp.read().decode())
        return out


@pytest.fixture(scope="session")
def e2e(slot: Slot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ERun]:
    prefix, net_id, metrics_port = slot.bed
    workdir = Path(tmp_path_factory.mktemp("e2e"))
    # A state file: an enricher restarted without one treats the runs it meets as baselines (DESIGN §4)
    enricher_args = ("--flow-aggregation", ",".join(AGGREGATION), "--no-flow-logs-stdout",
                     "--state-file", str(workdir / "enricher-state.json.gz"), "--checkpoint-interval", "1s")
    cfg = RunConfig(prefix=prefix, net_id=net_id, zones=2, nodes_per_zone=2, interval_s=1.0,
                    grpc_port=GRPC_PORT, metrics_port=metrics_port, enricher_args=enricher_args,
                    workdir=workdir)
    run = E2ERun(cfg)
    engine: Engine | None = None
    dns_servers: list[DnsServer] = []
    try:
        run.start(traffic=False)
        truth.install(run.cluster)
        listeners = [Listener(p.netns, TEST_PORT, p.name) for p in run.cluster.routed_pods()]
        listeners += [Listener(n.netns, TEST_PORT, n.name) for n in run.cluster.nodes]
        listeners.append(Listener(run.cluster.internet_netns, TEST_PORT, "internet"))
        engine = Engine(tuple(listeners), ())
        engine.start()
        for node in run.cluster.nodes:
            dns_servers.append(DnsServer(node.netns, run.real.dns_addresses(run.cluster, node),
                                         run.real.records(run.cluster)))
            dns_servers[-1].start()
        yield run
    finally:
        for server in dns_servers:
            server.stop()
        if engine is not None:
            engine.stop()
        run.close()


KNOWN_WRONG: set[truth.Pair] = set()  # pairs a failed test found wrong: later tests leave them out


def node_local(cluster: Cluster, address: str) -> bool:
    """An address every node answers from itself: NodeLocal DNS, and the kube-dns cluster IP it binds."""
    return address in {realnet.NODELOCAL_DNS, cluster.plan.service_ip(realnet.KUBE_DNS_VIP, 4)}


def owner_node(cluster: Cluster, address: str, peer: str | None = None) -> NodeSpec | None:
    """The node an address is on; a node-local address is on the node of its peer (a pod asks its own)."""
    if peer is not None and node_local(cluster, address):
        return owner_node(cluster, peer)
    owner = cluster.owner_of(address)
    return owner.node if isinstance(owner, PodSpec) else owner


def expected_class(cluster: Cluster, src: str, dst: str) -> str:
    """The traffic class from the cluster model alone (not from the enricher's logic)."""
    a, b = owner_node(cluster, src, dst), owner_node(cluster, dst, src)
    if a is None or b is None:
        return schema.TrafficClass.EXTERNAL.value
    if a.name == b.name:
        return schema.TrafficClass.SAME_NODE.value
    return (schema.TrafficClass.SAME_ZONE if a.zone == b.zone else schema.TrafficClass.CROSS_ZONE).value


Series = tuple[truth.Pair, dict[str, str], float]


def enricher_series(run: ClusterRun, only: int | None = None) -> list[Series]:
    """Every flow-bytes series of every enricher replica (`only`: that one): (address pair, labels, bytes)."""
    scrapes = run.scrapes() if isinstance(run, E2ERun) else [run.scrape()]
    if only is not None:
        scrapes = scrapes[only:only + 1]
    out = []
    for text in scrapes:
        for labels, value in parse(text, time.monotonic()).samples.get(FLOW_BYTES, []):
            key = (str(ipaddress.ip_address(labels[L(schema.SOURCE_ADDRESS)])),
                   str(ipaddress.ip_address(labels[L(schema.DESTINATION_ADDRESS)])),
                   labels.get(L(schema.NETWORK_TRANSPORT), ""))
            out.append((key, labels, value))
    return out


def enricher_rows(run: ClusterRun) -> dict[truth.Pair, Row]:
    rows: dict[truth.Pair, Row] = {}
    for key, labels, value in enricher_series(run):
        previous = rows.get(key)
        before = (previous.bytes, previous.named) if previous else (0.0, ())
        rows[key] = Row(value + before[0], labels, (*before[1], labels))
    return rows


def in_scope(cluster: Cluster, pair: truth.Pair) -> bool:
    """TCP and UDP sent by a pod or a node of the cluster (NodeLocal DNS included), or seemingly by a
    cluster IP or the internet (no sender: what the enricher shows from them must be nothing), except
    the agents' own OTLP and API calls to the host.

    Also out of scope: a pod talking to its own node's addresses (its node's IP, NodeLocal DNS). Such
    packets are delivered to the node, never cross its POSTROUTING hook, so the datapath cannot see them
    (DESIGN §2: one hook, POSTROUTING); they are same-node traffic, which no provider bills.
    """
    src, dst, proto = pair
    if proto not in {"tcp", "udp"} or dst in {cluster.plan.host(4), cluster.plan.host(6)}:
        return False
    if pair in KNOWN_WRONG:
        return False
    src_owner = cluster.owner_of(src)
    if src_owner is None:
        ip = ipaddress.ip_address(src)
        return (node_local(cluster, src) or ip in ipaddress.ip_network(cluster.plan.service_cidr(ip.version))
                or src in {cluster.plan.internet(4), cluster.plan.internet(6)})
    if isinstance(src_owner, PodSpec):
        return dst not in src_owner.node.addresses and not node_local(cluster, dst)
    return True


def diff_exact(run: ClusterRun) -> tuple[dict[truth.Pair, int], dict[truth.Pair, Row],
                                          dict[truth.Pair, tuple[int | None, int | None]]]:
    """(truth, enricher rows, differences as (truth, enricher)) over the pairs in scope, now."""
    counted, problem = truth.read_checked(run.cluster)
    want = {k: v for k, v in counted.items() if in_scope(run.cluster, k)}
    rows = enricher_rows(run)
    got = {k: int(r.bytes) for k, r in rows.items() if in_scope(run.cluster, k)}
    diff = {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}
    if problem is not None:  # the bed's own counters disagree: not the product's fault, retried, then failed
        diff[("ground truth", problem, "")] = (None, None)
    return want, rows, diff


def wait_exact(run: ClusterRun, timeout_s: float = EXACT_TIMEOUT_S) -> tuple[dict[truth.Pair, int],
                                                                            dict[truth.Pair, Row]]:
    """Poll until the enricher's bytes equal the ground truth for every pair in scope; fail with the diff.

    The pairs found wrong join KNOWN_WRONG, so one wrong shape fails its own test, not every later one.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        want, rows, diff = diff_exact(run)
        if not diff:
            return want, rows
        if time.monotonic() > deadline:
            KNOWN_WRONG.update(diff)
            pytest.fail(f"enricher bytes differ from nftables ground truth (pair: (truth, enricher)): {diff}")
        time.sleep(0.5)


def exchange_from_port(ns: str, address: str, port: int, sport: int, *, request_bytes: int,
                       response_bytes: int) -> None:
    """`exchange`, from source port `sport` (SO_REUSEADDR: again while an earlier one is in TIME_WAIT)."""
    def body() -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(5.0)
            sock.bind(("", sport))
            sock.connect((address, port))
            request(sock, request_bytes, response_bytes)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the server's FIN: every packet of the exchange has left

    run_in_netns(ns, body)


def run_exchanges(jobs: list[tuple[str, str, int, int]], workers: int = 16, port: int = TEST_PORT) -> None:
    """(client netns, server address, request bytes, response bytes) each as one bounded connection."""
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(exchange, ns, addr, port, request_bytes=req, response_bytes=resp)
                   for ns, addr, req, resp in jobs]
        for future in futures:
            future.result()
