"""The blind-datapath check for real: `otel-kzt agent` on a node whose pod forwarding bypasses netfilter,
as Cilium's eBPF host routing does (tests/kernel/hostrouting.py: `bpf_redirect_neigh` from pod A's
veth to pod B's veth and to the uplink, with IP forwarding off in the node, so nothing but that program
can carry the packets).

- `netfilter` there: POSTROUTING never sees the pods' packets; within a few intervals the agent reports
  itself blind (coverage gauge under 0.5, a WARNING naming the modes to try), while the node's nftables
  POSTROUTING counter shows 0 packets and the receiving pod got them all.
- `cgroup` there: counts at the sending socket, so it is exact (the exported flow's bytes and packets equal
  what the receiving pod's nftables counted) and reads covered.
- `tc` there: what pod A sends off the node (host-routed to the uplink as well) is exact at the uplink's
  egress; what stays on the node, which tc does not see by design, is not expected: no wolf cried.
- `netfilter` on the same node routed the usual way: covered, no warning (no wolf either).

The agent runs as deployed: its metadata from the RBAC-enforcing test API server in the root namespace,
with its own ServiceAccount's token (its list/watch connections leave over the uplink, as in a cluster).

    root netns                       kb<run>-n (node)                      pods
    OTLP receiver, UDP sink                       ┌── kb<run>a ═ eth0  kb<run>-a 10.94.1.2/24
    10.93.<run>.1/30 kb<run>r ═══ kb<run>u ───────┤
                     10.93.<run>.2/30 (default)   └── kb<run>b ═ eth0  kb<run>-b 10.94.2.2/24
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otel_kzt import netns, schema
from tests.kernel.conftest import joined_cgroup
from tests.kernel.hostrouting import host_routing
from tests.support.k8s_cluster import AGENT, ServedCluster
from tests.support.k8s_objects import make_node, make_pod
from tests.support.processes import CLI, stop
from tests.unit.test_agent_support import GrpcReceiver, points

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
NS, POD_A, POD_B = f"kb{RUN}-n", f"kb{RUN}-a", f"kb{RUN}-b"
DEV_A, DEV_B, UPLINK, UPLINK_ROOT = f"kb{RUN}a", f"kb{RUN}b", f"kb{RUN}u", f"kb{RUN}r"
ROOT_IP, NODE_IP = f"10.93.{RUN}.1", f"10.93.{RUN}.2"
A, B = "10.94.1.2", "10.94.2.2"
PORT, SIZE, BURST = 5555, 1000, 100  # per burst: 100 datagrams of 1,028 IP bytes
INTERVAL_S = 0.5
TRAFFIC = str(Path(__file__).with_name("traffic.py"))


def _nft(ns: str, script: str) -> None:
    netns.run_in(ns, ["nft", "-f", "-"], input=script)


def _counter(ns: str, name: str) -> tuple[int, int]:
    out = netns.run_in(ns, ["nft", "-j", "list", "counter", "inet", "kb", name]).stdout
    item = next(i for i in json.loads(out)["nftables"] if "counter" in i)
    return int(item["counter"]["bytes"]), int(item["counter"]["packets"])


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Iterator[tuple[GrpcReceiver, int]]:
    """The node, its two pods, a receiver and a UDP sink in the root namespace (its port: what pod A
    sends off the node is received there, so no ICMP error goes anywhere). The test process joins a
    cgroup of its own (cgroup mode's root: every process it starts, the pods' senders too, is below it)."""
    rx = GrpcReceiver("0.0.0.0:0")
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-16:].strip("-")
    with joined_cgroup(f"kb{RUN}-{name}"), netns.Topology() as topo:
        for ns in (NS, POD_A, POD_B):
            topo.netns(ns)
        topo.veth(None, UPLINK_ROOT, NS, UPLINK, a_addrs=[f"{ROOT_IP}/30"], b_addrs=[f"{NODE_IP}/30"])
        topo.veth(NS, DEV_A, POD_A, "eth0", a_addrs=["10.94.1.1/24"], b_addrs=[f"{A}/24"])
        topo.veth(NS, DEV_B, POD_B, "eth0", a_addrs=["10.94.2.1/24"], b_addrs=[f"{B}/24"])
        topo.route(POD_A, "default", via="10.94.1.1")
        topo.route(POD_B, "default", via="10.94.2.1")
        topo.route(NS, "default", via=ROOT_IP)  # the uplink (tc hooks it; the other modes leave it out)
        for ns in (NS, POD_A, POD_B):  # no router solicitations, no MLD: only the test's traffic
            netns.run_in(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
            netns.run_in(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"])
        # What netfilter's POSTROUTING in the node sees of pod A, and what pod B receives (then drops: no
        # ICMP errors come back).
        _nft(
            NS,
            f"""table inet kb {{
            counter post {{ }}
            chain post {{
                type filter hook postrouting priority 0;
                ip saddr {A} counter name post
            }}
        }}""",
        )
        _nft(
            POD_B,
            f"""table inet kb {{
            counter rx {{ }}
            chain input {{
                type filter hook input priority 0;
                ip saddr {A} udp dport {PORT} counter name rx drop
            }}
        }}""",
        )
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        topo.on_close("udp sink", sink.close)
        sink.bind((ROOT_IP, 0))
        rx.start()
        topo.on_close("otlp receiver", rx.stop)
        yield rx, sink.getsockname()[1]


def _agent(
    tmp_path: Path, receiver: GrpcReceiver, control: ServedCluster, mode: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """The agent as deployed: metadata from the API server with its own token (via the uplink)."""
    control.sync(
        [
            make_node(NS, [NODE_IP], zone="z1"),
            make_pod("kb-a", NS, [A], namespace="kb"),
            make_pod("kb-b", NS, [B], namespace="kb"),
        ]
    )
    own_cgroup = next(
        line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")
    )
    argv = [*CLI, "agent", "--node-name", NS, "--no-pin",
            "--interval", f"{INTERVAL_S}s", "--otlp-timeout", "1s",
            "--otlp-endpoint", f"http://{ROOT_IP}:{receiver.port}", *control.args(AGENT, via=ROOT_IP),
            "--datapath", mode, "--cgroup-root", f"/sys/fs/cgroup/unified{own_cgroup.strip()}"]  # fmt: skip
    log = tmp_path / f"agent-{mode}.log"
    with log.open("wb") as out:
        proc = netns.popen_in(NS, argv, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 90  # compiling the program on a busy machine
    while len(receiver.snapshot()) < 2:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the agent never exported"
        time.sleep(0.2)
    return proc, log


def _coverage(receiver: GrpcReceiver) -> list[float]:
    """Every coverage value the agent exported, in order (absent while it has no verdict)."""
    return [float(str(p["_value"])) for p in points(receiver.snapshot(), schema.OTLP_AGENT_DATAPATH_COVERAGE)]


def _flow(receiver: GrpcReceiver, dst: str, port: int | None = None) -> tuple[int, int]:
    """The last exported cumulative (bytes, packets) of pod A's UDP flow to `dst` (and `port`)."""
    last: dict[str, int] = {}
    for metric in (schema.FLOW_BYTES, schema.FLOW_PACKETS):
        for p in points(receiver.snapshot(), metric):
            if (p.get(schema.SOURCE_ADDRESS), p.get(schema.DESTINATION_ADDRESS)) == (A, dst) and p.get(
                schema.DESTINATION_PORT
            ) == port:
                last[metric] = int(str(p["_value"]))
    return last.get(schema.FLOW_BYTES, 0), last.get(schema.FLOW_PACKETS, 0)


def _send_until(done: Callable[[], bool], what: str, sink_port: int = 0) -> int:
    """Bursts from pod A to pod B (and with `sink_port`, off the node to the root's sink), every half
    interval, until `done()`; returns the bursts sent to the sink."""
    deadline, off_node = time.monotonic() + 10 * INTERVAL_S + 5, 0
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        netns.run_in(POD_A, [sys.executable, TRAFFIC, "udp", B, str(PORT), str(BURST), str(SIZE)])
        if sink_port:
            netns.run_in(
                POD_A, [sys.executable, TRAFFIC, "udp", ROOT_IP, str(sink_port), str(BURST), str(SIZE)]
            )
            off_node += 1
        time.sleep(INTERVAL_S / 2)
    return off_node


def _wait(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def _warnings(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "datapath blind" in line]


@pytest.mark.parametrize("mode", ["netfilter", "cgroup", "tc"])
def test_host_routing_past_netfilter(
    node: tuple[GrpcReceiver, int], served_cluster: ServedCluster, tmp_path: Path, mode: str
) -> None:
    receiver, sink_port = node
    with netns.entered(NS), host_routing([(DEV_A, B, DEV_B), (DEV_A, ROOT_IP, UPLINK)]):
        proc, log = _agent(tmp_path, receiver, served_cluster, mode)
        try:
            if mode == "netfilter":  # a few intervals of pod traffic: the agent says it is blind
                off_node = _send_until(lambda: any(r < 0.5 for r in _coverage(receiver)), "blind", sink_port)
                assert _coverage(receiver)[-1] == pytest.approx(0.0, abs=0.05)
                [warning] = _warnings(log)
                assert "WARNING" in warning and "--datapath cgroup" in warning
            else:
                off_node = _send_until(lambda: len(_coverage(receiver)) >= 3, "three verdicts", sink_port)
                assert min(_coverage(receiver)) >= 0.95 and _warnings(log) == []
            time.sleep(2 * INTERVAL_S)  # the last bursts' export
            received = _counter(POD_B, "rx")
            assert received[1] > 0 and received[1] % BURST == 0  # pod B got every datagram...
            assert _counter(NS, "post") == (0, 0)  # ...none of pod A's packets passed netfilter
            off = (off_node * BURST * (20 + 8 + SIZE), off_node * BURST)
            if mode == "cgroup":  # exact for both
                _wait(
                    lambda: _flow(receiver, B, PORT) == received, f"{_flow(receiver, B, PORT)} == {received}"
                )
                _wait(lambda: _flow(receiver, ROOT_IP) == off, f"{_flow(receiver, ROOT_IP)} == {off}")
            if mode == "tc":  # exact for what left the node; what stayed is not its to see
                _wait(lambda: _flow(receiver, ROOT_IP) == off, f"{_flow(receiver, ROOT_IP)} == {off}")
                assert _flow(receiver, B, PORT) == (0, 0)
        finally:
            stop(proc)


def test_routed_the_usual_way_netfilter_reads_covered(
    node: tuple[GrpcReceiver, int], served_cluster: ServedCluster, tmp_path: Path
) -> None:
    receiver, _ = node
    netns.enable_forwarding(NS)
    proc, log = _agent(tmp_path, receiver, served_cluster, "netfilter")
    try:
        _send_until(lambda: len(_coverage(receiver)) >= 3, "three verdicts")
        coverage = _coverage(receiver)
        assert min(coverage) >= 0.95 and not math.isnan(min(coverage)), coverage
        assert _warnings(log) == []
        assert _counter(NS, "post")[1] == _counter(POD_B, "rx")[1] > 0
    finally:
        stop(proc)
