"""A real `otel-kzt agent --datapath tc` following its node's devices (tcwatch.py): a second uplink plugged
in while it runs is hooked within a few intervals, the node's traffic leaving by it is exported exactly
(nftables at the peer it reaches is the oracle), and its own /metrics counts the addition; unplugged, the
removal is counted and the agent holds no link of it any more. With tcx links and with classic filters.

    root netns: OTLP receiver ── kt<run>r ═══ kt<run>u ── kt<run>-n (the agent; default route via root)
                10.96.<run>.1/30                 10.96.<run>.2/30
                                                       └─ kt<run>x ═══ eth0 kt<run>-p (plugged in later)
                                                          10.97.<run>.1   .2, 10.98.<run>.1 on lo
"""

from __future__ import annotations

import json
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
from otel_kzt.agent.datapath import tc
from tests.kernel.conftest import Net
from tests.support.nodenet import node_behind_veth
from tests.support.processes import CLI, stop
from tests.unit.test_agent_support import GrpcReceiver, points

pytestmark = [pytest.mark.kernel, pytest.mark.parametrize("attach", ["tcx", "classic"])]

RUN = os.getpid() % 200 + 20
NS, PEER = f"kt{RUN}-n", f"kt{RUN}-p"
ROOT_IP, NODE_IP = f"10.96.{RUN}.1", f"10.96.{RUN}.2"
LATE, LATE_IP, PEER_IP, REMOTE = f"kt{RUN}x", f"10.97.{RUN}.1", f"10.97.{RUN}.2", f"10.98.{RUN}.1"
INTERVAL_S = 0.4
PORT, COUNT, SIZE = 7100, 30, 200
TRAFFIC = str(Path(__file__).with_name("traffic.py"))


@pytest.fixture
def node(
    attach: str, tmp_path: Path
) -> Iterator[tuple[netns.Topology, GrpcReceiver, subprocess.Popen[bytes]]]:
    receiver = GrpcReceiver("0.0.0.0:0")
    with netns.Topology() as topo:
        node_behind_veth(topo, NS, f"kt{RUN}", ROOT_IP, NODE_IP)
        netns.add_route(NS, "default", via=ROOT_IP)  # the uplink: what tc hooks at the start
        receiver.start()
        topo.on_close("otlp receiver", receiver.stop)
        argv = [*CLI, "agent", "--node-name", NS, "--no-pin", "--datapath", "tc",
                "--interval", f"{INTERVAL_S}s", "--otlp-timeout", "1s",
                "--otlp-endpoint", f"http://{ROOT_IP}:{receiver.port}"]  # fmt: skip
        env = {**os.environ, tc.CLASSIC_ENV: "1" if attach == "classic" else "0"}
        with (tmp_path / "agent.log").open("wb") as log:
            proc = netns.popen_in(NS, argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
        topo.on_close("agent", lambda: stop(proc))
        yield topo, receiver, proc


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        with urllib.request.urlopen(f"http://{NODE_IP}:9465/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def devices() -> tuple[float, ...] | None:
    """(hooked, added, removed, deferred) on the agent's /metrics; None before its first pass."""
    got = scrape()
    hooked = got.get((schema.AGENT_DATAPATH_DEVICES, ()))
    if hooked is None:
        return None
    changes = schema.AGENT_DATAPATH_DEVICE_CHANGES + "_total"
    label = schema.AGENT_DEVICE_CHANGE_LABEL
    return (hooked, *(got[(changes, ((label, c),))] for c in schema.DEVICE_CHANGES))


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> float:
    """Seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"timed out waiting until {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def link_fds(pid: int) -> int:
    """The agent's open BPF link fds (with --no-pin, a link's only hold)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:bpf_link"
        except OSError:
            continue
    return count


def plug_in(topo: netns.Topology) -> None:
    topo.netns(PEER)
    topo.veth(NS, LATE, PEER, "eth0", a_addrs=[f"{LATE_IP}/30"], b_addrs=[f"{PEER_IP}/30"])
    netns.add_address(PEER, "lo", f"{REMOTE}/32")
    netns.add_route(NS, f"{REMOTE}/32", via=PEER_IP)  # a gateway route: the default device choice takes it
    Net(NS, "", "").nft(
        ns=PEER,
        script=f"""
        table inet kd {{
            counter late {{ }}
            chain pre {{
                type filter hook prerouting priority -300; policy accept;
                ip saddr {LATE_IP} ip daddr {REMOTE} udp dport {PORT} counter name late drop
            }}
        }}""",
    )


def exported(receiver: GrpcReceiver) -> list[tuple[object, object]]:
    """Every exported (bytes, packets) of the node's flow to the peer, oldest first."""
    with receiver.lock:
        requests = list(receiver.requests)
    match = {schema.SOURCE_ADDRESS: LATE_IP, schema.DESTINATION_PORT: PORT}
    pairs = zip(points(requests, schema.FLOW_BYTES), points(requests, schema.FLOW_PACKETS), strict=True)
    return [(b["_value"], p["_value"]) for b, p in pairs if all(b.get(k) == v for k, v in match.items())]


def bpf_links() -> set[int]:
    listed = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {int(link["id"]) for link in json.loads(listed.stdout or "[]")}


def test_an_uplink_plugged_in_while_the_agent_runs_is_hooked_counted_and_let_go(
    node: tuple[netns.Topology, GrpcReceiver, subprocess.Popen[bytes]], attach: str
) -> None:
    topo, receiver, proc = node
    wait_for(lambda: devices() == (1, 0, 0, 0), "the agent hooks its uplink", 90)
    links_before, fds_before = bpf_links(), link_fds(proc.pid)
    assert fds_before == (attach == "tcx")

    plug_in(topo)
    took = wait_for(lambda: devices() == (2, 1, 0, 0), "the new uplink hooked", 10)
    print(f"hooked {took:.2f}s after the plug-in ({took / INTERVAL_S:.1f} intervals)")
    assert link_fds(proc.pid) == fds_before + (attach == "tcx")
    netns.run_in(NS, [sys.executable, TRAFFIC, "udp", REMOTE, str(PORT), str(COUNT), str(SIZE)])
    truth = Net(NS, "", "").nft_counter("late", ns=PEER)
    assert truth == (COUNT * (20 + 8 + SIZE), COUNT)
    wait_for(lambda: truth in exported(receiver), f"{truth} exported", 10)
    assert all(value == truth for value in exported(receiver)[-3:])  # and no more

    netns.delete_link(NS, LATE)  # unplugged
    wait_for(lambda: devices() == (1, 1, 1, 0), "the removal counted", 10)
    assert link_fds(proc.pid) == fds_before  # its link's fd closed: nothing holds it
    assert bpf_links() == links_before
    assert proc.poll() is None
