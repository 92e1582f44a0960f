"""A real `otel-kzt agent --datapath tc` following its node's devices (tcwatch.py): a device plugged in
while it runs is hooked within a few intervals, the node's traffic leaving by it is exported exactly, and
its own /metrics counts the addition; unplugged, the removal is counted and the agent holds no link of it
any more. With tcx links and with classic filters. The devices:

- a second uplink (a veth to a peer; nftables at the peer is the oracle);
- a VXLAN overlay (4789) over that uplink, plugged in with it: the uplink counts its packets as their
  inner ones (no overlay was hooked at the start), so it is left to the uplink, counted as `covered`, and
  the node's flow inside it is exported exactly (nftables at the peer's VXLAN device is the oracle);
- a device without an Ethernet header (a TUN device, standing for a WireGuard or IP tunnel device, which
  this kernel lacks), routed by a default route in a table of its own; what the test reads from the TUN
  file, one IP packet per read, is the oracle. Its start used to matter: the program was compiled for
  Ethernet devices only while every hooked one was, and such a device waited for a restart (`deferred`).
  Now each device's flags are read per packet (tc.py DeviceConfig), and it is hooked like any other.

    root netns: OTLP receiver ── kt<run>r ═══ kt<run>u ── kt<run>-n (the agent; default route via root)
                10.96.<run>.1/30                 10.96.<run>.2/30
                                                       ├─ kt<run>x ═══ eth0 kt<run>-p (plugged in later)
                                                       │  10.97.<run>.1   .2, 10.98.<run>.1 on lo
                                                       │  kt<run>v (VXLAN 42 over it) 10.95.<run>.1 ══ .2
                                                       └─ kt<run>t (TUN, plugged in later): 10.99.<run>.0/24
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
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
from tests.kernel.test_datapath_tc_l3 import IFF_NO_PI, IFF_TUN, TUNSETIFF, read_to
from tests.support.nodenet import node_behind_veth
from tests.support.processes import CLI, stop
from tests.unit.test_agent_support import GrpcReceiver, points

pytestmark = [pytest.mark.kernel, pytest.mark.parametrize("attach", ["tcx", "classic"])]

RUN = os.getpid() % 200 + 20
NS, PEER = f"kt{RUN}-n", f"kt{RUN}-p"
ROOT_IP, NODE_IP = f"10.96.{RUN}.1", f"10.96.{RUN}.2"
LATE, LATE_IP, PEER_IP, REMOTE = f"kt{RUN}x", f"10.97.{RUN}.1", f"10.97.{RUN}.2", f"10.98.{RUN}.1"
VX, VX_IP, VX_PEER_IP, VX_PORT = f"kt{RUN}v", f"10.95.{RUN}.1", f"10.95.{RUN}.2", 7102
TUN, TUN_NET, TUN_DST, TUN_TABLE = f"kt{RUN}t", f"10.99.{RUN}.0/24", f"10.99.{RUN}.2", "77"
# The TUN flow is made to look like an Ethernet frame to a program that took the device for one: from
# 8.0.69.1 (bytes 12-13, the "EtherType", 0x0800; byte 14 0x45), 2,673 bytes long (the destination's first
# two bytes, 10.99, are 2,659 = the length less 14: the "IP length"), sport 8192 (no "fragment offset"),
# dport 7185 (its low byte 17: "UDP"). Read so, it would count a flow of other addresses and ports.
TUN_SRC, TUN_SPORT, TUN_DPORT, TUN_SIZE = "8.0.69.1", 8192, 7185, 2673 - 28
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
    """(hooked, added, removed, covered) on the agent's /metrics; None before its first pass."""
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
    count_at_peer("late", LATE_IP, REMOTE, PORT)


def count_at_peer(counter: str, src: str, dst: str, port: int) -> None:
    """An nftables counter at the peer's prerouting of the UDP datagrams from `src` to `dst`:`port`
    (dropped there: they go nowhere further)."""
    Net(NS, "", "").nft(
        ns=PEER,
        script=f"""
        table inet kd {{
            counter {counter} {{ }}
            chain {counter} {{
                type filter hook prerouting priority -300; policy accept;
                ip saddr {src} ip daddr {dst} udp dport {port} counter name {counter} drop
            }}
        }}""",
    )


def exported(
    receiver: GrpcReceiver, src: str = LATE_IP, dst: str = REMOTE, port: int = PORT
) -> list[tuple[object, object]]:
    """Every exported (bytes, packets) of the node's flow from `src` to `dst`:`port`, oldest first."""
    with receiver.lock:
        requests = list(receiver.requests)
    match = {schema.SOURCE_ADDRESS: src, schema.DESTINATION_ADDRESS: dst, schema.DESTINATION_PORT: port}
    pairs = zip(points(requests, schema.FLOW_BYTES), points(requests, schema.FLOW_PACKETS), strict=True)
    return [(b["_value"], p["_value"]) for b, p in pairs if all(b.get(k) == v for k, v in match.items())]


def bpf_links() -> set[int]:
    listed = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {int(link["id"]) for link in json.loads(listed.stdout or "[]")}


def hooked_at_start(proc: subprocess.Popen[bytes], attach: str) -> tuple[set[int], int]:
    """Once the agent hooked its uplink: the kernel's BPF links and the agent's link fds."""
    wait_for(lambda: devices() == (1, 0, 0, 0), "the agent hooks its uplink", 90)
    links_before, fds_before = bpf_links(), link_fds(proc.pid)
    assert fds_before == (attach == "tcx")
    return links_before, fds_before


def test_an_uplink_plugged_in_while_the_agent_runs_is_hooked_counted_and_let_go(
    node: tuple[netns.Topology, GrpcReceiver, subprocess.Popen[bytes]], attach: str
) -> None:
    topo, receiver, proc = node
    links_before, fds_before = hooked_at_start(proc, attach)
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


@contextlib.contextmanager
def tun_plugged_in() -> Iterator[int]:
    """A TUN device in the node, up, its prefix routed into it and a default route of its own table (what
    the default device choice takes); yields its file. Unplugged (the device goes with its file) at exit."""
    with netns.entered(NS):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TUN.encode(), IFF_TUN | IFF_NO_PI))
        netns.ip(NS, "link", "set", TUN, "mtu", "9000", "up")
        netns.ip(NS, "address", "add", f"{TUN_SRC}/32", "dev", TUN)
        netns.ip(NS, "route", "add", TUN_NET, "dev", TUN, "src", TUN_SRC)
        netns.ip(NS, "route", "add", "default", "dev", TUN, "table", TUN_TABLE)
        yield fd
    finally:
        os.close(fd)


def test_a_device_without_an_ethernet_header_plugged_in_while_the_agent_runs_is_hooked_and_exact(
    node: tuple[netns.Topology, GrpcReceiver, subprocess.Popen[bytes]], attach: str
) -> None:
    _topo, receiver, proc = node
    links_before, fds_before = hooked_at_start(proc, attach)
    with tun_plugged_in() as fd:
        took = wait_for(lambda: devices() == (2, 1, 0, 0), "the TUN device hooked", 10)
        print(f"TUN hooked {took:.2f}s after the plug-in ({took / INTERVAL_S:.1f} intervals)")
        assert link_fds(proc.pid) == fds_before + (attach == "tcx")
        read_to(fd, TUN_DST)  # what the kernel sent on its own
        netns.run_in(NS, [sys.executable, TRAFFIC, "udp", TUN_DST, str(TUN_DPORT), str(COUNT),
                          str(TUN_SIZE), str(TUN_SPORT)])  # fmt: skip
        truth = read_to(fd, TUN_DST)
        assert truth == (COUNT * (20 + 8 + TUN_SIZE), COUNT)
        flow = lambda: exported(receiver, TUN_SRC, TUN_DST, TUN_DPORT)  # noqa: E731
        wait_for(lambda: truth in flow(), f"{truth} exported", 10)
        assert all(value == truth for value in flow()[-3:])
    wait_for(lambda: devices() == (1, 1, 1, 0), "the removal counted", 10)
    assert link_fds(proc.pid) == fds_before
    assert bpf_links() == links_before
    assert proc.poll() is None


def plug_in_vxlan() -> None:
    """A VXLAN device (4789) over the plugged-in uplink, and its twin at the peer, counting what arrives."""
    for ns, name, local, remote, address in ((NS, VX, LATE_IP, PEER_IP, VX_IP),
                                             (PEER, "vx0", PEER_IP, LATE_IP, VX_PEER_IP)):  # fmt: skip
        netns.ip(ns, "link", "add", name, "type", "vxlan", "id", "42", "local", local, "remote", remote,
                 "dstport", "4789", "dev", "eth0" if ns == PEER else LATE)  # fmt: skip
        netns.add_address(ns, name, f"{address}/24")
        netns.ip(ns, "link", "set", name, "up")
    count_at_peer("inside", VX_IP, VX_PEER_IP, VX_PORT)  # the inner packets, out of the peer's vx0


def test_a_vxlan_overlay_plugged_in_while_the_agent_runs_is_counted_inside_at_the_uplink(
    node: tuple[netns.Topology, GrpcReceiver, subprocess.Popen[bytes]], attach: str
) -> None:
    topo, receiver, proc = node
    hooked_at_start(proc, attach)
    plug_in(topo)
    plug_in_vxlan()
    took = wait_for(lambda: devices() == (2, 1, 0, 1), "the uplink hooked, the overlay left to it", 10)
    print(f"uplink hooked and overlay covered {took:.2f}s after the plug-in")
    netns.run_in(NS, [sys.executable, TRAFFIC, "udp", VX_PEER_IP, str(VX_PORT), str(COUNT), str(SIZE)])
    truth = Net(NS, "", "").nft_counter("inside", ns=PEER)
    assert truth == (COUNT * (20 + 8 + SIZE), COUNT)
    flow = lambda: exported(receiver, VX_IP, VX_PEER_IP, VX_PORT)  # noqa: E731
    wait_for(lambda: truth in flow(), f"{truth} exported", 10)
    assert all(value == truth for value in flow()[-3:])
    netns.delete_link(NS, VX)
    netns.delete_link(NS, LATE)
    wait_for(lambda: devices() == (1, 1, 1, 1), "the removal counted", 10)
    assert proc.poll() is None
