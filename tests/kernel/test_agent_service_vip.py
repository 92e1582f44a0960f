"""`otel-kzt agent --datapath cgroup` and Service VIPs, for real: the agent lists Services from the
RBAC-enforcing API server with its own ServiceAccount, and exports pod A's flow to the ClusterIP and
`kzt.agent.service_vip.bytes` (kzt_agent_service_vip_bytes_total) equal to what the backend received.

The topology, the Service and kube-proxy's DNAT are test_datapath_service_vip.py's. The agent runs in the
root namespace: the cgroup hook counts the sockets below its root wherever their namespaces are, and the
receiver and the API server are reached on 127.0.0.1 there.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from otel_kzt import netns, schema
from tests.kernel.conftest import Net
from tests.kernel.test_datapath_service_vip import (
    NODE,
    PORT,
    TARGET,
    VIP,
    kube_proxy,
    metadata,  # noqa: F401 -- the fixture (the served cluster)
)
from tests.support.k8s_cluster import AGENT, ServedCluster
from tests.support.processes import CLI, stop
from tests.unit.test_agent_support import GrpcReceiver, points

pytestmark = [pytest.mark.kernel, pytest.mark.parametrize("mode", ["cgroup"], indirect=True)]


@pytest.mark.usefixtures("metadata")
def test_the_agent_exports_the_vip_flow_and_its_bytes(
    net: Net, topo: netns.Topology, served_cluster: ServedCluster, cgroup_root: str, tmp_path: Path
) -> None:
    kube_proxy(net)
    net.one_segment_per_buffer()
    net.count_received(net.pod_b, net.a4, net.b4, match=f"tcp dport {TARGET}", name="kdwire")
    net.serve_tcp(topo, net.pod_b, TARGET)
    receiver = GrpcReceiver("127.0.0.1:0").start()
    topo.on_close("otlp receiver", receiver.stop)
    argv = [*CLI, "agent", "--node-name", NODE, "--no-pin",
            "--interval", "0.5s", "--otlp-endpoint", f"http://127.0.0.1:{receiver.port}",
            *served_cluster.args(AGENT, via="127.0.0.1"), "--datapath", "cgroup",
            "--cgroup-root", cgroup_root, "--health-endpoint", ""]  # fmt: skip
    log = tmp_path / "agent.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    topo.on_close("agent", lambda: stop(proc))

    def exported(metric: str, **match: str) -> list[int]:
        found = points(receiver.snapshot(), metric)
        return [int(str(p["_value"])) for p in found if all(p.get(k) == v for k, v in match.items())]

    def wait(check: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"timed out: {what}\n{log.read_text()}"
            time.sleep(0.2)

    wait(lambda: bool(exported(schema.OTLP_AGENT_SERVICE_VIP_BYTES)), "the agent's first exports", 90)
    net.traffic(net.pod_a, "tcp-send", VIP[4], PORT, 200_000)
    wire = net.nft_counter("kdwire", ns=net.pod_b)
    assert wire[0] > 200_000
    vip_flow = {schema.DESTINATION_ADDRESS: VIP[4], schema.SOURCE_POD_NAME: "client-1"}
    wait(lambda: exported(schema.FLOW_BYTES, **vip_flow)[-1:] == [wire[0]], f"the VIP flow = {wire}", 10)
    wait(lambda: exported(schema.OTLP_AGENT_SERVICE_VIP_BYTES)[-1] == wire[0], "the VIP bytes", 10)
    assert exported(schema.FLOW_PACKETS, **vip_flow)[-1] == wire[1]
