"""The agent for real: `otel-kzt agent` processes in simulated nodes exporting to an OTLP/gRPC receiver.

Every name starts with "ka" plus a per-run number (two runs of this module at once must not share a
namespace, a root interface, a root address or a pin); everything is removed even on failure (Topology,
agent finalizers, pins).

    root netns: OTLP receiver and the RBAC-enforcing API server (agents read it with their own token) on
                0.0.0.0:<port>, reached at 10.89.<run>.1 (from n1) / .5 (from n2)

    ka-p1 10.88.1.2 ─┐                                                      ┌─ ka-p2 10.88.2.2
    ka-p3 10.88.3.2 ─┴─ ka-n1 ══ VXLAN 4789 (10.88.200.0/24) over ka12 ══ ka-n2 ─┘
                        underlay 10.88.12.1                    10.88.12.2

Pod traffic between the nodes goes through the VXLAN overlay, so each node's POSTROUTING sees the inner
packet and the encapsulated one: only the inner one may be exported, once, by the source node. The ground
truth is nftables counters in ka-n1's postrouting hook.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from otel_kzt import netns, schema
from otel_kzt.agent.datapath import cleanup
from otel_kzt.agent.datapath.pins import DEFAULT_PIN_ROOT as PIN_ROOT
from tests.support.incluster import InCluster
from tests.support.k8s_apiserver import AGENT, FakeApiServer
from tests.support.k8s_cluster import ServedCluster
from tests.support.k8s_objects import make_node, make_pod
from tests.support.processes import CLI
from tests.unit.test_agent_support import GrpcReceiver, HttpReceiver, points

pytestmark = pytest.mark.kernel

TRAFFIC = str(Path(__file__).with_name("traffic.py"))
RUN = os.getpid() % 200 + 20
N1, N2, P1, P2, P3 = (f"ka{RUN}-{name}" for name in ("n1", "n2", "p1", "p2", "p3"))
IP = {P1: "10.88.1.2", P2: "10.88.2.2", P3: "10.88.3.2", N1: "10.88.12.1", N2: "10.88.12.2"}
IP6 = {P1: "fd88:1::2", P2: "fd88:2::2", P3: "fd88:3::2"}  # pods are dual-stack (local IPv6 only)
UPLINK = {N1: f"10.89.{RUN}.1", N2: f"10.89.{RUN}.5"}  # the root side, as seen from each node
INTERVAL = "0.4s"
UID = {P1: "uid-ka-p1", P2: "uid-ka-p2", P3: "uid-ka-p3"}
# nftables ground truth in ka-n1: one counter per test flow (destination port).
GROUND_TRUTH = """
table inet ka {
    counter d5000 {}
    counter d5001 {}
    counter d5002 {}
    counter d5003 {}
    counter d5004 {}
    counter d5005 {}
    counter d6000 {}
    counter d6001 {}
    counter vxlan {}
    chain post {
        type filter hook postrouting priority 0; policy accept;
        ip saddr 10.88.1.2 ip daddr 10.88.2.2 udp dport 5000 counter name d5000
        ip saddr 10.88.1.2 ip daddr 10.88.2.2 udp dport 5001 counter name d5001
        ip saddr 10.88.1.2 ip daddr 10.88.2.2 udp dport 5002 counter name d5002
        ip saddr 10.88.3.2 ip daddr 10.88.2.2 udp dport 5003 counter name d5003
        ip saddr 10.88.1.2 ip daddr 10.88.2.2 udp dport 5004 counter name d5004
        ip saddr 10.88.1.2 ip daddr 10.88.2.2 udp dport 5005 counter name d5005
        ip saddr 10.88.1.2 ip daddr 10.88.3.2 udp dport 6000 counter name d6000
        ip6 saddr fd88:1::2 ip6 daddr fd88:3::2 udp dport 6001 counter name d6001
        ip saddr 10.88.12.1 ip daddr 10.88.12.2 udp dport 4789 counter name vxlan
    }
}
"""
DROP_UDP = """
table inet kadrop {
    chain input {
        type filter hook input priority 0; policy accept;
        meta l4proto udp drop
    }
}
"""


def _build(topo: netns.Topology) -> None:
    for ns in (N1, N2, P1, P2, P3):
        topo.netns(ns)
    for i, node in ((1, N1), (2, N2)):
        root, peer = f"10.89.{RUN}.{4 * i - 3}/30", f"10.89.{RUN}.{4 * i - 2}/30"
        topo.veth(None, f"ka{RUN}r{i}", node, f"ka{RUN}u{i}", a_addrs=[root], b_addrs=[peer])
    topo.veth(N1, "ka12", N2, "ka21", a_addrs=[f"{IP[N1]}/24"], b_addrs=[f"{IP[N2]}/24"])
    for node, pod, gw in ((N1, P1, "10.88.1.1"), (N1, P3, "10.88.3.1"), (N2, P2, "10.88.2.1")):
        gw6 = f"fd88:{pod[-1]}::1"
        topo.veth(
            node,
            f"ka{pod[-1]}",
            pod,
            "eth0",
            a_addrs=[f"{gw}/24", f"{gw6}/64"],
            b_addrs=[f"{IP[pod]}/24", f"{IP6[pod]}/64"],
        )
        topo.route(pod, "default", via=gw)
        topo.route(pod, "default", via=gw6)
    for node, local, remote, dev, overlay in (
        (N1, IP[N1], IP[N2], "ka12", "10.88.200.1/24"),
        (N2, IP[N2], IP[N1], "ka21", "10.88.200.2/24"),
    ):
        netns.ip(
            node,
            "link",
            "add",
            "kavx",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            local,
            "remote",
            remote,
            "dstport",
            "4789",
            "dev",
            dev,
        )
        netns.add_address(node, "kavx", overlay)
        netns.ip(node, "link", "set", "kavx", "up")
        netns.enable_forwarding(node)
    topo.route(N1, "10.88.2.0/24", via="10.88.200.2")
    topo.route(N2, "10.88.1.0/24", via="10.88.200.1")
    topo.route(N2, "10.88.3.0/24", via="10.88.200.1")
    netns.run_in(N1, ["nft", "-f", "-"], input=GROUND_TRUTH)
    # No listeners in ka-p2/ka-p3: drop UDP there so no ICMP errors come back.
    for pod in (P2, P3):
        netns.run_in(pod, ["nft", "-f", "-"], input=DROP_UDP)


def _objects(with_p3: bool = True) -> list[dict[str, Any]]:
    objects = [make_node(N1, [IP[N1]], zone="z1"), make_node(N2, [IP[N2]], zone="z2")]
    for pod, node in ((P1, N1), (P2, N2), (P3, N1)):
        if pod != P3 or with_p3:
            objects.append(make_pod(pod, node, [IP[pod], IP6[pod]], uid=UID[pod]))
    return objects


class Bed:
    """Agents read metadata from `control` (the RBAC-enforcing API server) with the agent's own token."""

    def __init__(
        self, topo: netns.Topology, receiver: GrpcReceiver, control: ServedCluster, workdir: Path
    ) -> None:
        self.topo, self.receiver, self.control, self.workdir = topo, receiver, control, workdir
        # id(request) -> (request, its node, its flows: (ident, bytes point, packets point)); see _parsed.
        self._parsed_cache: dict[
            int, tuple[Any, str, list[tuple[str, dict[str, object], dict[str, object]]]]
        ] = {}

    def metadata_args(self, node: str) -> list[str]:
        """`--kubeconfig` as the agent's ServiceAccount, the server reached from `node`'s netns."""
        return self.control.args(AGENT, via=UPLINK[node])

    def traffic(self, ns: str, *args: object) -> dict[str, Any]:
        proc = netns.run_in(ns, [sys.executable, TRAFFIC, *map(str, args)], timeout=120)
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def nft(self, counter: str) -> tuple[int, int]:
        out = netns.run_in(N1, ["nft", "-j", "list", "counter", "inet", "ka", counter]).stdout
        item = next(i for i in json.loads(out)["nftables"] if "counter" in i)
        return int(item["counter"]["bytes"]), int(item["counter"]["packets"])

    def _parsed(self, request: Any) -> tuple[str, list[tuple[str, dict[str, object], dict[str, object]]]]:
        """A request's node and flows, parsed once. The receiver lives for the whole module and agents
        adopt the pinned map of the test before, so its 5,000 flows are exported again and again: waits
        that parsed every request at each poll (~0.1 s of CPU per such request) took longer than their
        timeouts on a loaded machine, with the value there all along (the CI of c6c96d0)."""
        cached = self._parsed_cache.get(id(request))
        if cached is None or cached[0] is not request:  # the entry keeps its request: no id is reused
            node = next(
                (kv.value.string_value for kv in request.resource_metrics[0].resource.attributes
                 if kv.key == schema.RESOURCE_NODE_NAME),
                "",
            )  # fmt: skip
            pairs = zip(
                points([request], schema.FLOW_BYTES), points([request], schema.FLOW_PACKETS), strict=True
            )
            flows = [
                (json.dumps({k: v for k, v in b.items() if not k.startswith("_")}, sort_keys=True), b, p)
                for b, p in pairs
            ]
            cached = self._parsed_cache[id(request)] = (request, node, flows)
        return cached[1], cached[2]

    def node_requests(self, node: str) -> list[Any]:
        return [r for r in self.receiver.snapshot() if self._parsed(r)[0] == node]

    def node_flows(self, node: str) -> Iterator[tuple[str, dict[str, object], dict[str, object]]]:
        """(ident, bytes point, packets point) of every flow `node` exported, oldest first (read only)."""
        for request in self.node_requests(node):
            yield from self._parsed(request)[1]

    def latest(self, node: str, **match: object) -> dict[str, tuple[dict[str, object], dict[str, object]]]:
        """The last exported (bytes point, packets point) per flow of `node` whose attributes match."""
        out: dict[str, tuple[dict[str, object], dict[str, object]]] = {}
        for ident, b, p in self.node_flows(node):
            if all(b.get(k) == v for k, v in match.items()):
                out[ident] = (b, p)
        return out

    def wait_exports(self, node: str, count: int = 2, timeout: float = 60.0) -> None:
        """Wait until `count` more requests of `node` arrived (a full export after what happened)."""
        target = len(self.node_requests(node)) + count
        wait_for(lambda: len(self.node_requests(node)) >= target, timeout, f"{count} exports of {node}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    workdir = tmp_path_factory.mktemp("ka")
    receiver = GrpcReceiver("0.0.0.0:0")
    control = ServedCluster(workdir, host="0.0.0.0")
    with netns.Topology() as topo:
        _build(topo)
        receiver.start()
        topo.on_close("otlp receiver", receiver.stop)
        control.start()
        topo.on_close("test API server", control.stop)
        control.sync(_objects())
        for node in (N1, N2):
            cleanup(node, PIN_ROOT)  # leftovers of a crashed run
            topo.on_close(f"pins of {node}", lambda node=node: cleanup(node, PIN_ROOT))
        yield Bed(topo, receiver, control, workdir)


class Agent:
    """One `otel-kzt agent` process in a node netns; stopped (SIGTERM, then SIGKILL) by its finalizer."""

    def __init__(self, bed: Bed, node: str, *extra: str, pod: InCluster | None = None) -> None:
        """`pod`: run it in that pod's view (in-cluster configuration, no metadata flags)."""
        self.bed, self.node = bed, node
        self.log = bed.workdir / f"agent-{node}-{time.monotonic_ns()}.log"
        argv = [
            *(pod.wrapper(UPLINK[node]) if pod else ()),
            *CLI,
            "agent",
            "--node-name",
            node,
            "--interval",
            INTERVAL,
            "--otlp-endpoint",
            f"http://{UPLINK[node]}:{bed.receiver.port}",
            "--pin-root",
            PIN_ROOT,
            "--cluster-name",
            "ka",
            *(extra or ([] if pod else bed.metadata_args(node))),
        ]
        with self.log.open("wb") as log:
            self.proc = netns.popen_in(node, argv, stdout=subprocess.DEVNULL, stderr=log)

    def wait_running(self) -> None:
        """Running once it has delivered an export (the datapath is attached before the first one)."""
        self.bed.wait_exports(self.node, 1, timeout=90)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def agents(bed: Bed) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(node: str, *extra: str, pod: InCluster | None = None) -> Agent:
        agent = Agent(bed, node, *extra, pod=pod)
        started.append(agent)
        agent.wait_running()
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()


def flow(bed: Bed, node: str, src: str, dst: str, dport: int) -> tuple[dict[str, object], dict[str, object]]:
    got = bed.latest(
        node, **{schema.SOURCE_ADDRESS: src, schema.DESTINATION_ADDRESS: dst, schema.DESTINATION_PORT: dport}
    )
    assert len(got) == 1, f"expected one series {src}->{dst}:{dport}, got {list(got)}"
    return next(iter(got.values()))


def test_attributes_exact_values_forwarded_absent_overlay_not_counted(bed: Bed, agents: Any) -> None:
    agents(N1)
    agents(N2)
    bed.traffic(P1, "udp", IP[P2], 5000, 200, 700)
    bed.traffic(P1, "udp", IP[P3], 6000, 30, 300)
    bed.traffic(P1, "udp", IP6[P3], 6001, 20, 400)
    time.sleep(0.2)
    bed.wait_exports(N1)
    bed.wait_exports(N2)
    b, p = flow(bed, N1, IP[P1], IP[P2], 5000)
    assert (b["_value"], p["_value"]) == bed.nft("d5000") == (200 * 728, 200)
    assert b[schema.SOURCE_POD_NAME] == P1 and b[schema.SOURCE_POD_UID] == UID[P1]
    assert b[schema.SOURCE_NAMESPACE_NAME] == "shop"
    assert (b[schema.NETWORK_TYPE], b[schema.NETWORK_TRANSPORT]) == ("ipv4", "udp")
    assert schema.SOURCE_PORT not in b and schema.DESTINATION_POD_NAME not in b  # p2 is on ka-n2
    local_b, _ = flow(bed, N1, IP[P1], IP[P3], 6000)
    assert local_b["_value"] == bed.nft("d6000")[0]
    assert (local_b[schema.DESTINATION_POD_NAME], local_b[schema.DESTINATION_POD_UID]) == (P3, UID[P3])
    v6_b, v6_p = flow(bed, N1, IP6[P1], IP6[P3], 6001)
    assert (v6_b["_value"], v6_p["_value"]) == bed.nft("d6001") == (20 * 448, 20)  # payload + 8 + 40
    assert (v6_b[schema.NETWORK_TYPE], v6_b[schema.SOURCE_POD_NAME], v6_b[schema.DESTINATION_POD_NAME]) == (
        "ipv6",
        P1,
        P3,
    )
    # The encapsulated packets happened, and are not exported on top of the inner ones.
    assert bed.nft("vxlan")[1] >= 200
    assert bed.latest(N1, **{schema.DESTINATION_PORT: 4789}) == {}
    # ka-n2 forwarded every one of those packets to ka-p2: not its to count.
    assert bed.latest(N2, **{schema.SOURCE_ADDRESS: IP[P1]}) == {}
    resource = {
        kv.key: kv.value.string_value
        for kv in bed.node_requests(N1)[-1].resource_metrics[0].resource.attributes
    }
    assert resource[schema.SERVICE_NAME] == schema.AGENT_SERVICE_NAME
    assert (resource[schema.RESOURCE_NODE_NAME], resource[schema.CLUSTER_NAME]) == (N1, "ka")
    assert points(bed.node_requests(N1)[-1:], schema.OTLP_AGENT_METADATA_SYNCED)[0]["_value"] == 1.0


def test_five_thousand_flows_all_present_unfolded(bed: Bed, agents: Any) -> None:
    agents(N1)
    bed.traffic(P1, "udp-ports", IP[P2], 20000, 5000, 64)
    time.sleep(0.2)
    bed.wait_exports(N1)
    got = [
        b
        for b, _ in bed.latest(N1, **{schema.SOURCE_ADDRESS: IP[P1]}).values()
        if 20000 <= int(b[schema.DESTINATION_PORT]) < 25000
    ]  # type: ignore[call-overload]
    assert len(got) == 5000
    assert {b["_value"] for b in got} == {92}  # 64 bytes + UDP 8 + IPv4 20
    assert not any("otel.metric.overflow" in b for b in got)


def test_receiver_away_then_back_totals_exact(bed: Bed, agents: Any) -> None:
    agents(N1)
    port = bed.receiver.port
    bed.receiver.stop()
    try:
        bed.traffic(P1, "udp", IP[P2], 5001, 300, 500)
        time.sleep(2.0)  # several intervals of refused exports
        bed.traffic(P1, "udp", IP[P2], 5001, 100, 500)
    finally:
        bed.receiver.port = port
        bed.receiver.start()
    wait_for(lambda: bool(bed.latest(N1, **{schema.DESTINATION_PORT: 5001})), 30, "export after return")
    bed.wait_exports(N1, 1)
    b, p = flow(bed, N1, IP[P1], IP[P2], 5001)
    assert (b["_value"], p["_value"]) == bed.nft("d5001") == (400 * 528, 400)


def test_agent_restart_while_traffic_flows(bed: Bed, agents: Any) -> None:
    first = agents(N1)
    sender = netns.popen_in(
        P1, [sys.executable, TRAFFIC, "udp-stream", IP[P2], "5002", "5", "200", "1"], stdout=subprocess.PIPE
    )
    bed.topo.on_close("udp-stream", lambda: (sender.poll() is None and sender.kill(), sender.wait()))
    try:
        wait_for(lambda: bool(bed.latest(N1, **{schema.DESTINATION_PORT: 5002})), 30, "first export")
        before, _ = flow(bed, N1, IP[P1], IP[P2], 5002)
        assert first.stop() == 0  # SIGTERM: final export, clean exit, datapath stays pinned
        time.sleep(0.5)  # traffic goes on while no agent runs
        agents(N1)
        out, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    sent = json.loads(out.decode().strip().splitlines()[-1])["sent"]
    time.sleep(0.2)
    bed.wait_exports(N1)
    after, packets = flow(bed, N1, IP[P1], IP[P2], 5002)
    assert (after["_value"], packets["_value"]) == bed.nft("d5002") == (sent * 228, sent)
    assert after["_start"] == before["_start"]  # the same series: start time kept across the restart


def test_pod_created_mid_run_gets_named(bed: Bed, agents: Any, tmp_path: Path) -> None:
    with FakeApiServer() as api:
        for obj in _objects(with_p3=False):
            api.add(obj)
        forward = _Forwarder(UPLINK[N1], api.url.rsplit(":", 1)[1])
        bed.topo.on_close("api forwarder", forward.close)
        # The agent's own ServiceAccount: the RBAC of deploy/rbac.yaml is what it may read.
        kubeconfig = api.write_kubeconfig(
            tmp_path / "kubeconfig", AGENT, f"http://{UPLINK[N1]}:{forward.port}"
        )
        agents(N1, "--kubeconfig", kubeconfig)
        bed.traffic(P3, "udp", IP[P2], 5003, 50, 100)
        bed.wait_exports(N1, 3)
        assert bed.latest(N1, **{schema.DESTINATION_PORT: 5003}) == {}  # unknown source: not exported
        api.add(make_pod(P3, N1, [IP[P3]], uid=UID[P3]))
        bed.traffic(P3, "udp", IP[P2], 5003, 10, 100)
        wait_for(lambda: bool(bed.latest(N1, **{schema.DESTINATION_PORT: 5003})), 30, "named flow")
        bed.wait_exports(N1, 1)
        b, p = flow(bed, N1, IP[P3], IP[P2], 5003)
        assert (b[schema.SOURCE_POD_NAME], b[schema.SOURCE_POD_UID]) == (P3, UID[P3])
        # Counted all along: what was sent before the pod was known is in the total.
        assert (b["_value"], p["_value"]) == bed.nft("d5003") == (60 * 128, 60)
        forward.close()


def test_agent_in_cluster_names_pods_across_a_token_rotation(bed: Bed, agents: Any, tmp_path: Path) -> None:
    """The agent in a pod's view (ServiceAccount volume, HTTPS verified through its ca.crt, no kubeconfig):
    after kubelet rotates its token (the old one refused at once), it still learns new pods. Without the
    token re-read (k8s/kubeclient.py) it sent the old one for a minute: 401, the pod stayed unnamed."""
    with FakeApiServer(tls_dir=tmp_path / "pki", host="0.0.0.0", tls_ips=(UPLINK[N1],)) as api:
        api.add_many(_objects(with_p3=False))
        pod = InCluster(tmp_path, api, AGENT)
        agents(N1, pod=pod)
        assert api.refusals == [] and "watch pods" in api.requests
        pod.rotate()
        start = len(api.requests)
        api.drop_connections()  # every watch reconnects with whatever token the agent sends now
        api.add(make_pod(P3, N1, [IP[P3]], uid=UID[P3]))
        wait_for(lambda: "watch pods" in api.requests[start:], 30, "the pod watch resumed")
        bed.traffic(P3, "udp", IP[P2], 5013, 10, 100)
        match = {schema.SOURCE_ADDRESS: IP[P3], schema.DESTINATION_PORT: 5013}
        wait_for(lambda: bool(bed.latest(N1, **match)), 30, "named flow")
        b, _ = flow(bed, N1, IP[P3], IP[P2], 5013)
        assert (b[schema.SOURCE_POD_NAME], b[schema.SOURCE_POD_UID]) == (P3, UID[P3])
        assert all(r.startswith("401 ") for r in api.refusals), api.refusals


class _Forwarder:
    """Forwards TCP from `host`:<port> (reachable from the node netns) to the API server on 127.0.0.1."""

    def __init__(self, host: str, target_port: str) -> None:
        self._target = ("127.0.0.1", int(target_port))
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            return  # the other side or close() ended the connection
        finally:
            dst.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            sock.close()


def test_idle_flow_final_export_then_eviction_loses_nothing(bed: Bed, agents: Any) -> None:
    """Packets sent after the idle pass read the map, before the eviction, reach the old series' final
    value: the receiver holds back its answer to that pass (the agent evicts only once it is delivered)
    while the test sends them.

    Both sends are timed by the agent's own passes, from a socket opened in the pod's netns beforehand
    (microseconds, well inside the agent's 2 s deadline on a loaded machine). A flow's last-seen time is
    the snapshot that first saw its packet count, so the 40 packets, sent inside one pass's held answer,
    are seen by the next pass (not idle: just seen) and idle at the one after (2 s > 1 s): that pass
    evicts once answered, and the 7 racing packets are sent inside its held answer. (Timed by a sender
    process, the 7 took longer than the deadline under load: that pass failed, the next one held the same
    idle value and raced again.) Should that pass's answer still miss its deadline, nothing is evicted,
    the 47 are exported as a value and evicted later: the test still holds."""
    match = {schema.SOURCE_ADDRESS: IP[P1], schema.DESTINATION_PORT: 5004}
    phase = [0]  # 0: send the 40; 1, 2: passes that saw the 40 (the second races the 7); 3: done
    claim = threading.Lock()
    sent = threading.Event()
    errors: list[BaseException] = []
    with netns.entered(P1):
        pod_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stays in P1's netns

    def send(count: int) -> None:
        for _ in range(count):
            pod_socket.sendto(b"u" * 100, (IP[P2], 5004))

    def race(request: Any) -> None:
        node = {kv.key: kv.value.string_value for kv in request.resource_metrics[0].resource.attributes}
        if node.get(schema.RESOURCE_NODE_NAME) != N1:
            return
        values = [p["_value"] for p in points([request], schema.FLOW_BYTES) if _matches(p, match)]
        with claim:  # one request at a time: a retry and the next pass can overlap under load
            try:  # reported by the test thread, not swallowed by the gRPC server
                if phase[0] == 0 and not values:
                    send(40)  # after this pass's snapshot
                    phase[0] = 1
                elif phase[0] == 1 and values == [40 * 128]:
                    phase[0] = 2  # the pass that first saw them: not idle yet
                elif phase[0] == 2 and values == [40 * 128]:
                    send(7)  # the idle pass: read, not yet evicted (it evicts once answered)
                    phase[0] = 3
                    sent.set()
            except BaseException as exc:
                errors.append(exc)
                sent.set()

    bed.receiver.on_export = race
    try:
        agent = agents(N1, *bed.metadata_args(N1), "--idle-timeout", "1s", "--interval", "2s")
        wait_for(sent.is_set, 30, "the idle pass")
        assert not errors, errors
        evicted = schema.OTLP_AGENT_FLOWS_EVICTED
        last = lambda: points(bed.node_requests(N1)[-1:], evicted)  # noqa: E731
        wait_for(lambda: any(p["_value"] != 0 for p in last()), 30, "eviction")
        seen = lambda: [(b["_start"], b["_value"]) for b, _ in bed_points(bed, match)]  # noqa: E731
        try:
            wait_for(lambda: 47 * 128 in [v for _, v in seen()], 30, "the final value")
        except AssertionError as exc:  # what the receiver got, and what the agent said
            raise AssertionError(f"{exc}: seen {seen()}\n{agent.log.read_text()[-6000:]}") from None
        time.sleep(2.5)  # the next flow on this key starts well after the first one
        bed.traffic(P1, "udp", IP[P2], 5004, 10, 100)
        wait_for(lambda: len({b["_start"] for b, _ in bed_points(bed, match)}) == 2, 30, "the new series")
        bed.wait_exports(N1, 1)
    finally:
        bed.receiver.on_export = None
        pod_socket.close()
    finals: dict[object, tuple[int, int]] = {}
    for b, p in bed_points(bed, match):
        finals[b["_start"]] = (int(str(b["_value"])), int(str(p["_value"])))
    first, second = (finals[s] for s in sorted(finals))  # type: ignore[type-var]
    # The old series' final value includes the 7 racing packets; then a fresh start.
    assert (first, second) == ((47 * 128, 47), (10 * 128, 10))
    assert first[0] + second[0] == bed.nft("d5004")[0]


def _matches(point: dict[str, object], match: dict[str, object]) -> bool:
    return all(point.get(k) == v for k, v in match.items())


def bed_points(bed: Bed, match: dict[str, object]) -> list[tuple[dict[str, object], dict[str, object]]]:
    """Every exported (bytes, packets) point of `match`, oldest first (latest() keeps one per series)."""
    return [(b, p) for _, b, p in bed.node_flows(N1) if all(b.get(k) == v for k, v in match.items())]


def test_http_protobuf_end_to_end(bed: Bed) -> None:
    """`--otlp-protocol http/protobuf` with gzip from a node to an OTLP/HTTP receiver: exact values."""
    receiver = HttpReceiver("0.0.0.0")
    agent: Agent | None = None
    try:
        url = f"http://{UPLINK[N1]}:{receiver.port}/v1/metrics"
        http_args = ("--otlp-protocol", "http/protobuf", "--otlp-endpoint", url, "--otlp-compression", "gzip")
        agent = Agent(bed, N1, *bed.metadata_args(N1), *http_args)
        # The datapath is attached before the first export: traffic from then on is counted.
        wait_for(lambda: bool(receiver.behaviour.bodies), 90, f"a first http/protobuf export ({agent.log})")
        bed.traffic(P1, "udp", IP[P2], 5005, 25, 300)
        match = {schema.SOURCE_ADDRESS: IP[P1], schema.DESTINATION_PORT: 5005}
        truth = bed.nft("d5005")

        def exported() -> list[tuple[object, object]]:
            requests = [_http_request(headers, body) for headers, body in list(receiver.behaviour.bodies)]
            pairs = zip(
                points(requests, schema.FLOW_BYTES), points(requests, schema.FLOW_PACKETS), strict=True
            )
            return [(b["_value"], p["_value"]) for b, p in pairs if _matches(b, match)]

        wait_for(lambda: truth in exported(), 60, f"{truth} (bytes, packets) over http/protobuf")
        headers = receiver.behaviour.bodies[-1][0]
        assert headers["content-type"] == "application/x-protobuf" and headers["content-encoding"] == "gzip"
        assert truth == (25 * 328, 25)  # 300 payload + 8 UDP + 20 IPv4
        assert agent.stop() == 0
    finally:
        if agent is not None:
            agent.stop()
        receiver.close()


def _http_request(headers: dict[str, str], body: bytes) -> ExportMetricsServiceRequest:
    raw = gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body
    return ExportMetricsServiceRequest.FromString(raw)


def _cli(ns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    return netns.run_in(ns, [*CLI, "agent", *args], timeout=120, check=False)


def test_no_pin_detaches_and_cleanup_uninstalls(bed: Bed, agents: Any) -> None:
    cleanup(N2, PIN_ROOT)
    agent = agents(N2, "--no-pin", *bed.metadata_args(N2))
    assert agent.stop() == 0
    assert not (Path(PIN_ROOT) / N2).exists()  # --no-pin: nothing left behind
    assert agents(N1).stop() == 0
    assert (Path(PIN_ROOT) / N1).exists()  # pinned: keeps counting for the next process
    done = _cli(N1, "--cleanup", "--node-name", N1, "--pin-root", PIN_ROOT)
    assert done.returncode == 0, done.stderr
    assert not (Path(PIN_ROOT) / N1).exists()


def test_print_bpf_and_bad_flags() -> None:
    printed = _cli(None, "--print-bpf", "--node-name", f"ka{RUN}-print")
    assert printed.returncode == 0, printed.stderr
    assert "SEC(" in printed.stdout or "int " in printed.stdout
    bad = _cli(None, "--node-name", "ka-bad", "--map-size", "12")
    assert bad.returncode == 2 and "map_size" in bad.stderr
    bad = _cli(None, "--node-name", "ka-bad", "--ephemeral-ports", "9-2")
    assert bad.returncode == 2 and "ephemeral_ports" in bad.stderr
