"""In-process agents for the deployment tests, and the small cluster they run in.

`start_agent` runs the agent's own interval loop (`AgentService`), naming (`LocalFlows`), metadata (list and
watch of the RBAC-enforcing test API server with the agent's own ServiceAccount token, as deployed) and
export layer (`Exporter`: rendezvous choice, failover, retries) over real gRPC, fed by `FakeDatapath`
instead of the kernel: the scale-out and dashboard questions are about routing and totals, not about
counting packets (tests/integration/test_scaleout_kernel.py does that part with real agents).
`Agent.close()` stops it. The enrichers of these tests read the same `ServedCluster` with their own token.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from otel_kzt.agent.config import AgentConfig, OtlpConfig
from otel_kzt.agent.export import Exporter, ExportResult
from otel_kzt.agent.flows import AF_INET, FlowCounters, FlowKey, Snapshot
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.service import AgentService
from otel_kzt.agent.state import ReceiverStore
from otel_kzt.k8s import MetadataHandle, open_metadata
from tests.support.k8s_cluster import AGENT, ServedCluster
from tests.support.k8s_objects import fresh, make_node, make_pod
from tests.support.service_fixtures import slice_for

# Three nodes in two zones (AWS, so the price table applies), pods named after their workloads.
NODES = {
    "kx-a1": ("192.168.61.1", "us-east-1a"),
    "kx-a2": ("192.168.61.2", "us-east-1a"),
    "kx-b1": ("192.168.61.3", "us-east-1b"),
}
PODS = {  # name -> (node, ip, owner kind, owner name)
    "web-5f7d9c8b6d-x1x1x": ("kx-a1", "10.61.1.10", "ReplicaSet", "web-5f7d9c8b6d"),
    "api-6c8b7d9f5a-y2y2y": ("kx-a2", "10.61.2.20", "ReplicaSet", "api-6c8b7d9f5a"),
    "cache-0": ("kx-b1", "10.61.3.30", "StatefulSet", "cache"),
}
EXTERNAL = "203.0.113.7"
REFERENCE_DEADLINE_S = 20.0  # however loaded the machine, the reference gets what the main receiver was sent
# Per node: (source ip, destination ip, protocol, src port, dst port, bytes per tick, packets per tick).
FLOWS: dict[str, list[tuple[str, str, int, int, int, int, int]]] = {
    "kx-a1": [
        ("10.61.1.10", "10.61.3.30", 6, 0, 6379, 150_000, 110),  # web -> cache: cross-zone
        ("10.61.1.10", "10.61.2.20", 6, 0, 8080, 40_000, 35),  # web -> api: same-zone
        ("10.61.1.10", EXTERNAL, 6, 0, 443, 9_000, 12),
    ],  # web -> internet: external
    "kx-a2": [
        ("10.61.2.20", "10.61.3.30", 6, 0, 6379, 70_000, 60),  # api -> cache: cross-zone
        ("10.61.2.20", "10.61.1.10", 6, 8080, 0, 35_000, 30),
    ],  # api's answers: same-zone
    "kx-b1": [
        ("10.61.3.30", "10.61.1.10", 6, 6379, 0, 260_000, 190),  # cache's answers: cross-zone
        ("10.61.3.30", "10.61.2.20", 6, 6379, 0, 120_000, 95),
    ],
}


def cluster_objects(*, services: bool = False) -> list[dict[str, Any]]:
    """Nodes and pods as the API server holds them; `services`: also the `cache` Service (its one endpoint,
    cache-0, in zone b), whose cross-zone clients in zone a get a spread-endpoints recommendation."""
    nodes = [
        make_node(n, [ip], zone=zone, provider_id=f"aws:///{zone}/i-{n}") for n, (ip, zone) in NODES.items()
    ]
    pods = [
        make_pod(
            name,
            node,
            [ip],
            owner=(kind, owner),
            template_hash=None if kind != "ReplicaSet" else owner.rsplit("-", 1)[1],
        )
        for name, (node, ip, kind, owner) in PODS.items()
    ]
    extra = []
    if services:
        svc = fresh("service-clusterip")
        svc["metadata"]["name"] = "cache"
        svc["spec"]["ports"] = [{"name": "redis", "protocol": "TCP", "port": 6379, "targetPort": 6379}]
        extra = [svc, slice_for("cache", "shop", [(PODS["cache-0"][1], NODES["kx-b1"][1])], 6379)]
    return nodes + pods + extra


@contextlib.contextmanager
def served(workdir: Path, *, services: bool = False) -> Iterator[ServedCluster]:
    """The test API server on 127.0.0.1 serving `cluster_objects`, stopped after the block even on failure."""
    with ServedCluster(workdir) as control:
        control.sync(cluster_objects(services=services))
        yield control


def _addr(text: str) -> bytes:
    return socket.inet_aton(text)


def flows_begin_ns() -> int:
    """A first-seen time for new fake flows: the next whole second. The agent reports whole-second starts
    (`local.stable_start`), and a run that began before an enricher started is a baseline to it (DESIGN
    §4): so the flows begin after every enricher started before this call."""
    return -(-time.time_ns() // 1_000_000_000) * 1_000_000_000


class FakeDatapath:
    """Cumulative per-flow counters growing by a fixed step per snapshot until frozen (the kernel's role),
    evicted as the kernel does: the final value goes to the next snapshot, the flow's next packets are a
    new entry with a later first-seen time (a whole second later at least: starts are whole seconds).

    Why not the kernel here: these tests check the deployment's wiring (which replica each agent picks,
    failover, sums over replicas, every dashboard query and rule in Prometheus) against a ground truth
    that must be exact at any instant (`totals()`, frozen on demand), on three nodes in one process. The
    real datapath's counting, the agent process and its export to real enrichers on the kernel are the
    kernel tests' and test_scaleout_kernel.py's (real agents in node namespaces, the same replicas and
    reference). It stands in at the `Datapath` seam (`snapshot`, `evict`) only, with the node's address:
    the loop, naming, metadata and export above it are the agent's own."""

    def __init__(self, node: str, start_unix_ns: int) -> None:
        self._flows = {
            FlowKey(AF_INET, _addr(s), _addr(d), proto, sp, dp): (b, p)
            for s, d, proto, sp, dp, b, p in FLOWS[node]
        }
        self._entry = dict.fromkeys(self._flows, (start_unix_ns, 0))  # the kernel entry: (start, ticks then)
        self._gone: dict[FlowKey, tuple[int, int]] = dict.fromkeys(self._flows, (0, 0))  # evicted totals
        self._finals: dict[FlowKey, FlowCounters] = {}
        self._ticks = 0
        self._lock = threading.Lock()
        self.frozen = threading.Event()

    def _counters(self, key: FlowKey, now: int) -> FlowCounters:
        (b, p), (start, then) = self._flows[key], self._entry[key]
        return FlowCounters(b * (self._ticks - then), p * (self._ticks - then), start, now)

    def snapshot(self) -> Snapshot:
        now = time.time_ns()
        with self._lock:
            if not self.frozen.is_set():
                self._ticks += 1
            finals, self._finals = self._finals, {}
            flows = {
                k: self._counters(k, now)
                for k, (start, then) in self._entry.items()
                if self._ticks > then and start <= now
            }
        return Snapshot(flows, 0, 0, 65536, now, evicted=finals)

    def evict(self, keys: Iterable[FlowKey]) -> int:
        now = time.time_ns()
        count = 0
        with self._lock:
            for key in keys:
                if key not in self._entry or self._ticks == self._entry[key][1]:
                    continue
                final = self._finals[key] = self._counters(key, now)
                gone = self._gone[key]
                self._gone[key] = (gone[0] + final.bytes, gone[1] + final.packets)
                self._entry[key] = (max(now, final.first_seen_unix_ns + 1_000_000_000), self._ticks)
                count += 1
        return count

    def totals(self) -> dict[FlowKey, tuple[int, int]]:
        now = time.time_ns()
        with self._lock:
            out = {}
            for key, (b, p) in self._gone.items():
                current = self._counters(key, now)
                out[key] = (b + current.bytes, p + current.packets)
            return out


class Tee:
    """Sends each request to the main exporter and, unchanged, to a reference exporter: what the main one
    sent (`ExportResult.reached`), delivered or not, as its receiver may have counted it and a move begins
    new runs from there (DESIGN §5.7); nothing of an export that moved before it sent anything (the
    service sends that interval again on new runs, and so does the reference then). The reference gets
    its own deadline: the one receiver that has everything must not miss what the main one timed out on."""

    def __init__(self, main: Exporter, reference: Exporter | None) -> None:
        self.main, self.reference = main, reference

    def export(self, requests: Iterable[bytes], deadline: float, stop: threading.Event) -> ExportResult:
        batch = list(requests)
        result = self.main.export(batch, deadline, stop)
        if self.reference is not None and result.reached:
            self.reference.export(batch, max(deadline, time.monotonic() + REFERENCE_DEADLINE_S), stop)
        return result

    def close(self) -> None:
        self.main.close()
        if self.reference is not None:
            self.reference.close()


@dataclass
class Agent:
    node: str
    datapath: FakeDatapath
    exporter: Exporter
    service: AgentService
    metadata: MetadataHandle
    sender: Tee
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        self.sender.close()
        self.metadata.shutdown()


def start_agent(
    node: str,
    endpoints: Sequence[str],
    control: ServedCluster,
    *,
    interval_s: float = 0.5,
    reference: str | None = None,
    down_s: float = 30.0,
    datapath: FakeDatapath | None = None,
    store: ReceiverStore | None = None,
) -> Agent:
    """The agent's loop for `node`, exporting over gRPC to `endpoints` (and a copy to `reference`), its
    metadata from `control`. `datapath` and `store`: a previous agent process's counters and receiver
    store (a restart: the pinned map and state hand them over); new ones by default."""
    otlp = OtlpConfig(endpoints=tuple(endpoints), timeout_s=2.0)
    config = AgentConfig(node_name=node, pin=False, interval_s=interval_s, otlp=otlp)
    handle = open_metadata(None, node_name=node, kubeconfig=str(control.kubeconfig(AGENT)))
    handle.start()
    if not handle.wait_ready(10):
        handle.shutdown()
        raise AssertionError(f"{node}: metadata did not sync from the API server")
    exporter = Exporter(otlp, node, down_s=down_s, max_backoff_s=1.0, store=store)
    ref = Exporter(replace(otlp, endpoints=(reference,)), node) if reference else None
    sender = Tee(exporter, ref)
    node_ip = NODES[node][0]
    local = LocalFlows(node, handle.index, interface_addresses=lambda: frozenset({node_ip}))
    datapath = datapath or FakeDatapath(node, flows_begin_ns())
    service = AgentService(config, datapath, sender, local, handle.index, host_name=node)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name=f"kx-agent-{node}", daemon=True)
    thread.start()
    return Agent(node, datapath, exporter, service, handle, sender, stop, thread)
