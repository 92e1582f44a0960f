"""The agent's health endpoint on the real kernel (--health-endpoint 0.0.0.0:9465 in its node namespace):

- its interval loop stuck in a datapath read (the loop's thread held inside `bpf(2)` with ptrace, its
  HTTP thread running): /healthz fails while the endpoint keeps answering, and recovers once the read
  returns;
- its metadata cannot sync (the API server answers 403: the agent's ClusterRole lacks pods, or nodes):
  alive, not ready, and /readyz says which resource failed how;
- /metrics equals the flow map's state: a 16-entry map filled by 40 UDP flows holds 16 flows (the export
  and API server connections, the health endpoint's own answers, the first 14 datagrams' flows) and the
  other 26 flows' bytes are overflow, exactly.

    root netns: OTLP receiver, API server  ── kh<run>r ═══ kh<run>u ──  kh<run>-n (the agent; IPv6 off)
                10.92.<run>.1/30                                     10.92.<run>.2/30
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import netns, schema
from otel_kzt.agent.datapath import bpfsys
from tests.kernel.test_agent_kernel import _Forwarder
from tests.support.k8s_apiserver import AGENT, FakeApiServer
from tests.support.k8s_cluster import ServedCluster
from tests.support.k8s_objects import make_node
from tests.support.k8s_rbac import Rbac
from tests.support.nodenet import node_behind_veth
from tests.support.processes import CLI, stop
from tests.support.ptrace import held_in_syscall
from tests.unit.test_agent_support import GrpcReceiver, points

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
NS = f"kh{RUN}-n"
ROOT_IP, NODE_IP = f"10.92.{RUN}.1", f"10.92.{RUN}.2"
INTERVAL_S = 0.4
HEALTH = f"http://{NODE_IP}:9465"
TRAFFIC = str(Path(__file__).with_name("traffic.py"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[GrpcReceiver]:
    rx = GrpcReceiver("0.0.0.0:0")
    with netns.Topology() as topo:
        node_behind_veth(topo, NS, f"kh{RUN}", ROOT_IP, NODE_IP)
        rx.start()
        topo.on_close("otlp receiver", rx.stop)
        yield rx


@pytest.fixture
def agent(receiver: GrpcReceiver, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> subprocess.Popen[bytes]:
        argv = [*CLI, "agent", "--node-name", NS, "--no-pin",
                "--interval", f"{INTERVAL_S}s", "--otlp-timeout", "1s",
                "--otlp-endpoint", f"http://{ROOT_IP}:{receiver.port}", *extra]  # fmt: skip
        with (tmp_path / f"agent-{len(started)}.log").open("wb") as log:
            started.append(netns.popen_in(NS, argv, stdout=subprocess.DEVNULL, stderr=log))
        wait_for(lambda: get("/healthz")[0] == 200, "the health endpoint answers", 90)
        return started[-1]

    try:
        yield start
    finally:
        for proc in started:
            stop(proc)


def get(path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(HEALTH + path, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening (yet)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def served(control: ServedCluster) -> list[str]:
    """The agent's metadata flags: the API server (its own token), serving this node."""
    control.sync([make_node(NS, [NODE_IP], zone="z1")])
    return control.args(AGENT, via=ROOT_IP)


def test_a_loop_stuck_in_a_datapath_read_fails_healthz_while_the_endpoint_answers(
    agent: Callable[..., subprocess.Popen[bytes]], served_cluster: ServedCluster
) -> None:
    proc = agent(*served(served_cluster))
    wait_for(lambda: get("/readyz")[0] == 200, "ready")
    with held_in_syscall(proc.pid, proc.pid, bpfsys.sys_bpf()):  # the main thread runs the loop
        wait_for(lambda: get("/healthz")[0] == 503, "/healthz fails", 15)
        status, body = get("/healthz")
        assert status == 503 and "interval loop stuck" in body
        status, body = get("/readyz")
        assert status == 503 and "export: last export delivered" in body
        assert get("/metrics")[0] == 200  # the last pass's numbers, still served
    wait_for(lambda: get("/healthz")[0] == 200 and get("/readyz")[0] == 200, "recovered", 15)
    proc.terminate()
    assert proc.wait(30) == 0


# What the agent's ClusterRole grants that it cannot run without (Services: only cgroup mode's VIP bytes,
# which are off while refused: tests/integration/test_k8s_sync.py).
REQUIRED = sorted({r for _, r in Rbac.shipped().granted("otel-kzt-agent")} - {"services"})


@pytest.mark.parametrize("resource", REQUIRED)
def test_metadata_that_cannot_sync_is_alive_but_not_ready(
    agent: Callable[..., subprocess.Popen[bytes]], receiver: GrpcReceiver, tmp_path: Path, resource: str
) -> None:
    """Each resource the agent's ClusterRole grants and it needs, removed in turn: it runs (exports), and
    says it is not ready, naming the resource and the 403, rather than exporting nothing as if all were
    well."""
    with FakeApiServer(rbac=Rbac.shipped().without("otel-kzt-agent", resource)) as api:
        api.add(make_node(NS, [NODE_IP], zone="z1"))
        forward = _Forwarder(ROOT_IP, api.url.rsplit(":", 1)[1])
        try:
            kubeconfig = api.write_kubeconfig(
                tmp_path / "kubeconfig", AGENT, f"http://{ROOT_IP}:{forward.port}"
            )
            proc = agent("--kubeconfig", str(kubeconfig))
            before = len(receiver.snapshot())
            wait_for(lambda: len(receiver.snapshot()) >= before + 2, "exports delivered meanwhile")
            assert get("/healthz")[0] == 200
            status, body = get("/readyz")
            assert status == 503 and "metadata: metadata not synced" in body, body
            assert f"list {resource}: HTTP 403 Forbidden: {resource}" in body, body
            assert "export:" not in body and "datapath:" not in body  # those two pass
            families = {f.name: f for f in text_string_to_metric_families(get("/metrics")[1])}
            assert families[schema.AGENT_METADATA_SYNCED].samples[0].value == 0
            synced = points(receiver.snapshot()[-1:], schema.OTLP_AGENT_METADATA_SYNCED)
            assert synced[0]["_value"] == 0.0
            proc.terminate()
            assert proc.wait(30) == 0
        finally:
            forward.close()


def test_metrics_equal_the_flow_maps_state(
    agent: Callable[..., subprocess.Popen[bytes]], receiver: GrpcReceiver, served_cluster: ServedCluster
) -> None:
    size, flows = 100, 40
    before = len(receiver.snapshot())  # the receiver is the module's: earlier tests' requests are in it
    proc = agent(*served(served_cluster), "--map-size", "16")
    # Ready: metadata listed (the API server's flow is in the map) and an export delivered (its flow too).
    wait_for(lambda: get("/readyz")[0] == 200, "ready")
    netns.run_in(
        NS, [sys.executable, TRAFFIC, "udp-ports", ROOT_IP, "20000", str(flows), str(size)], timeout=60
    )
    # Two passes after the traffic: the last one saw all of it.
    seen = len(receiver.snapshot())
    wait_for(lambda: len(receiver.snapshot()) >= seen + 2, "two exports after the traffic")
    families = {f.name: f for f in text_string_to_metric_families(get("/metrics")[1])}

    def value(name: str) -> float:
        return float(families[name].samples[0].value)

    # Two flows came first: the health endpoint's answers (port 9465), and the export and the API server's
    # list/watch connections as one (node -> root TCP: both servers listen on ephemeral ports, which never
    # enter a key).
    in_map = 16 - 2
    assert value(schema.AGENT_FLOWS_TRACKED) == 16
    assert value(schema.AGENT_MAP_FILL_RATIO) == 1.0
    datagram = 20 + 8 + size  # IPv4 + UDP headers + payload
    assert value(schema.AGENT_OVERFLOW_BYTES) == (flows - in_map) * datagram
    assert value(schema.AGENT_OVERFLOW_PACKETS) == flows - in_map
    # The same numbers the last export carried (one pass, two outputs).
    last = receiver.snapshot()[-1:]
    assert points(last, schema.OTLP_AGENT_OVERFLOW_BYTES)[0]["_value"] == (flows - in_map) * datagram
    assert points(last, schema.OTLP_AGENT_FLOWS_TRACKED)[0]["_value"] == 16
    exports = {s.labels[schema.AGENT_RESULT]: s.value for s in families[schema.AGENT_EXPORTS].samples
               if s.name.endswith("_total")}  # fmt: skip
    assert exports["failed"] == 0 and exports["ok"] >= len(receiver.snapshot()) - before - 1
    assert families[schema.AGENT_DATAPATH_INFO].samples[0].labels == {
        schema.AGENT_DATAPATH_LABEL: "netfilter"
    }
    proc.terminate()
    assert proc.wait(30) == 0
