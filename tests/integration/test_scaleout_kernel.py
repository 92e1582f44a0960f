"""Scale-out with real agents: `otel-kzt agent` processes counting real traffic in the kernel.

The demo's simulated cluster (one node per zone, three zones: network namespaces, real eBPF datapath per
node) runs three real agents whose `--otlp-endpoint` lists two real enricher replicas. Prometheus scrapes
both replicas. The replicas' summed bytes per address pair must equal the nftables ground truth counted at
the senders (what one replica shows: tests/e2e prove that), first with both replicas up, then after the
replica serving most agents is stopped mid-run and more traffic flows: the stopped replica's last values
plus the survivor's are the truth (the agents begin new runs at the survivor: nothing counted twice).

Names: prefix `kx` (namespaces, host link, lock /run/otel-kzt-kx.lock), address plan 10.207.0.0/16,
listener port 27080, OTLP and /metrics ports ephemeral.
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from otel_kzt import schema
from otel_kzt.agent.export import expand, rendezvous_rank, resolve
from otel_kzt.demo.cluster import NodeSpec
from otel_kzt.demo.runner import ORPHAN_GUARD, ClusterRun, RunConfig, reported_nodes, stop_process
from otel_kzt.demo.traffic import Engine, exchange
from otel_kzt.demo.workloads import Listener
from tests.conftest import kernel_unavailable_reason
from tests.e2e import truth
from tests.e2e.conftest import AGGREGATION, in_scope
from tests.integration import deploy_files as df
from tests.integration import deploy_stack as ds
from tests.support.k8s_cluster import ENRICHER, ServedRun
from tests.support.ports import free_port
from tests.support.processes import CLI

pytestmark = [pytest.mark.kernel, pytest.mark.integration]

PREFIX = "kx"
NET_ID = 207
TEST_PORT = 27080
L = schema.prom_label
PAIR = f"{L(schema.SOURCE_ADDRESS)}, {L(schema.DESTINATION_ADDRESS)}, {L(schema.NETWORK_TRANSPORT)}"


def _serves(url: str) -> bool:
    return ds.http_get(url)[0] == 200


class ReplicatedRun(ServedRun):
    """A ClusterRun whose enricher is two replicas and whose agents list both (rendezvous + failover);
    metadata from the RBAC-enforcing API server, each component with its own token."""

    def split(self) -> None:
        """Pick gRPC ports such that the agents do not all prefer the same replica."""
        host = self.cluster.plan.host(4)
        for _ in range(50):
            # free on every address: the replicas listen on the fabric's host address
            self.grpc_ports = [free_port(""), free_port("")]
            urls = [f"http://{host}:{p}" for p in self.grpc_ports]
            self.home = {
                n.name: urls.index(rendezvous_rank(n.name, expand(urls, False, resolve))[0].url)
                for n in self.cluster.nodes
            }
            if len(set(self.home.values())) == 2 and len(set(self.grpc_ports)) == 2:
                break
        self.metrics_ports = [ds.free_port(), ds.free_port()]
        self.replicas: list[subprocess.Popen[bytes] | None] = [None, None]

    def replica_argv(self, i: int) -> list[str]:
        argv = [
            *CLI,
            "enricher",
            "--kube-metadata",
            str(self.metadata_file),
            "--grpc-endpoint",
            f"{self.cluster.plan.host(4)}:{self.grpc_ports[i]}",
            "--http-endpoint",
            "",
            "--metrics-endpoint",
            f"127.0.0.1:{self.metrics_ports[i]}",
            *self.config.enricher_args,
        ]
        return self.metadata_args(argv, ENRICHER)

    def start_enricher(self) -> None:
        for i in range(2):
            out = self._log_file(f"enricher-{i}")
            self.replicas[i] = subprocess.Popen(
                [*ORPHAN_GUARD, *self.replica_argv(i)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for i in range(2):
            url = f"http://127.0.0.1:{self.metrics_ports[i]}/metrics"
            ds.wait_for(functools.partial(_serves, url), 30, f"replica {i} /metrics")

    def agent_argv(self, node: NodeSpec) -> list[str]:
        argv: list[str] = super().agent_argv(node)
        endpoints = ",".join(f"http://{self.cluster.plan.host(4)}:{p}" for p in self.grpc_ports)
        argv[argv.index("--otlp-endpoint") + 1] = endpoints
        return argv

    def scrape(self) -> str:
        # Both replicas together: every agent reported somewhere (wait_agents_reported reads this).
        texts = [
            ds.http_get(f"http://127.0.0.1:{p}/metrics")[1].decode()
            for i, p in enumerate(self.metrics_ports)
            if self.replicas[i] is not None
        ]
        return "\n".join(texts)

    def stop_replica(self, i: int) -> None:
        proc = self.replicas[i]
        if proc is not None:
            stop_process(proc)
            self.replicas[i] = None

    def stop_enricher(self, kill: bool = False) -> None:
        for i in range(2):
            self.stop_replica(i)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[ReplicatedRun, ds.PrometheusProcess]]:
    if kernel_unavailable_reason() is not None:
        pytest.skip(kernel_unavailable_reason() or "")  # the kernel marker decides skip vs fail first
    cfg = RunConfig(
        prefix=PREFIX,
        net_id=NET_ID,
        zones=3,
        nodes_per_zone=1,
        interval_s=0.5,
        enricher_args=("--flow-aggregation", ",".join(AGGREGATION), "--no-flow-logs-stdout"),
        workdir=tmp_path,
    )
    run = ReplicatedRun(cfg)
    run.split()
    engine: Engine | None = None
    prometheus: ds.PrometheusProcess | None = None
    try:
        run.start(traffic=False)
        truth.install(run.cluster)
        listeners = [Listener(p.netns, TEST_PORT, p.name) for p in run.cluster.routed_pods()]
        engine = Engine(tuple(listeners), ())
        engine.start()
        targets = [f"127.0.0.1:{p}" for p in run.metrics_ports]
        prometheus = ds.PrometheusProcess(tmp_path, {"otel-kzt-enricher": targets})
        yield run, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        if engine is not None:
            engine.stop()
        run.close()


def _jobs(run: ClusterRun, salt: int) -> list[tuple[str, str, int, int]]:
    pods = run.cluster.routed_pods()
    return [
        (a.netns, b.v4, 700 + 31 * i + salt, 3_000 + 977 * ((i + salt) % 13))
        for i, (a, b) in enumerate((a, b) for a in pods for b in pods if a.node.name != b.node.name)
    ]


def run_exchanges(jobs: list[tuple[str, str, int, int]]) -> None:
    """(client netns, server address, request bytes, response bytes): one bounded connection each."""
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(exchange, ns, addr, TEST_PORT, request_bytes=req, response_bytes=resp)
            for ns, addr, req, resp in jobs
        ]
        for future in futures:
            future.result()


def _wait_sum_equals_truth(run: ReplicatedRun, prometheus: ds.PrometheusProcess) -> dict[truth.Pair, int]:
    want: dict[truth.Pair, int] = {}
    got: dict[truth.Pair, int] = {}

    def equal() -> bool:
        nonlocal want, got
        want = {k: v for k, v in truth.read(run.cluster).items() if in_scope(run.cluster, k)}
        # Each replica's last value, live or stopped: a stopped replica keeps what it counted (the agents
        # begin new runs at the survivor, DESIGN §5.7), so the sum is the truth only if no byte is counted
        # twice, nor lost. (A counter's maximum over the run is its last value.)
        rows = prometheus.query(f"sum by ({PAIR}) (max_over_time({schema.PROM_FLOW_BYTES}_total[30m]))")
        got = {
            (
                r["metric"][L(schema.SOURCE_ADDRESS)],
                r["metric"][L(schema.DESTINATION_ADDRESS)],
                r["metric"][L(schema.NETWORK_TRANSPORT)],
            ): int(float(r["value"][1]))
            for r in rows
        }
        got = {k: v for k, v in got.items() if in_scope(run.cluster, k)}
        return bool(want) and want == got

    try:
        ds.wait_for(equal, 40, "the replicas' summed bytes to equal the ground truth", every=0.5)
    except AssertionError:
        diff = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
        raise AssertionError(f"(truth, replicas summed) differ: {diff}") from None
    return want


def _heard(prometheus: ds.PrometheusProcess, since_unix: float = 0.0) -> dict[str, set[str]]:
    """node -> the replica instances whose latest report from it is later than `since_unix`, from every
    sample Prometheus kept (`last_over_time`): a scrape that timed out on a loaded machine, or a report a
    little late, hides nothing, as a "reported in the last seconds" window would."""
    rows = prometheus.query(f"last_over_time({schema.ENRICHER_AGENT_LAST_REPORT}[1h])")
    out: dict[str, set[str]] = {}
    for r in rows:
        if float(r["value"][1]) > since_unix:
            node = r["metric"][schema.ENRICHER_AGENT_LAST_REPORT_LABEL]
            out.setdefault(node, set()).add(r["metric"]["instance"])
    return out


def test_real_agents_two_replicas_sum_to_the_truth_and_survive_losing_one(
    replicated: tuple[ReplicatedRun, ds.PrometheusProcess],
) -> None:
    run, prometheus = replicated
    targets = [f"127.0.0.1:{p}" for p in run.metrics_ports]
    nodes = {n.name for n in run.cluster.nodes}
    ds.wait_for(lambda: set(_heard(prometheus)) == nodes, 30, "every agent reporting")
    # Single writer: each agent has reported to exactly its rendezvous replica.
    assert _heard(prometheus) == {node: {targets[i]} for node, i in run.home.items()}

    jobs = _jobs(run, 0)
    assert len(jobs) >= 6, "pods on at least three nodes talk to each other"
    run_exchanges(jobs)
    before = _wait_sum_equals_truth(run, prometheus)
    # Jobs run both ways between every two pods on different nodes: one counted pair per job.
    assert len(before) == len(jobs)

    # The manifests' memory limits hold for real processes: agents after compiling and counting, replicas.
    agent_limit = df.memory_limit("DaemonSet", "otel-kzt-agent", "agent")
    enricher_limit = df.memory_limit("Deployment", "otel-kzt-enricher", "enricher")
    agent_peaks = [df.rss_bytes(p.pid) for p in run.agents.values()]
    agent_now = [df.rss_bytes(p.pid, "VmRSS") for p in run.agents.values()]
    replica_peaks = [df.rss_bytes(p.pid) for p in run.replicas if p is not None]
    mib = 2**20
    print(
        f"RSS MiB: agents peak {[round(b / mib) for b in agent_peaks]}"
        f" now {[round(b / mib) for b in agent_now]}"
        f" (limit {agent_limit / mib:.0f}); replicas peak {[round(b / mib) for b in replica_peaks]}"
        f" (limit {enricher_limit / mib:.0f})"
    )
    assert max(agent_peaks) < agent_limit and max(replica_peaks) < enricher_limit

    victim = max((0, 1), key=lambda i: list(run.home.values()).count(i))
    run.stop_replica(victim)
    stopped_unix = time.time()  # it has exited: no report it took is later
    survivor = targets[1 - victim]
    ds.wait_for(  # every agent has reported to the survivor since, and none to the stopped one
        lambda: _heard(prometheus, stopped_unix) == {node: {survivor} for node in nodes},
        30,
        "every agent failing over to the surviving replica",
    )
    run_exchanges(_jobs(run, 5))
    after = _wait_sum_equals_truth(run, prometheus)
    assert sum(after.values()) > sum(before.values())
    assert set(reported_nodes(run.scrape())) == nodes
