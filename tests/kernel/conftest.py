"""Kernel-test fixtures: a routed topology (two pods behind a node), the datapath attached in the node,
nftables counters as the independent ground truth, and the traffic generators of traffic.py.

Every name (netns, interface, pin, nft table) starts with "kd"; everything is removed even on failure.

The datapath runs in `netfilter` mode unless a test parametrizes the `mode` fixture (indirectly) with
`MODES`: `tc` then hooks both node devices' egress, `cgroup` the socket egress of a cgroup of the test's
own, which the test process joins before the topology is built (so every process it starts, and the
kernel sockets of the namespaces it creates, are below the cgroup root, as a node's pods are).

        kd-a (pod A)                 kd-n (node, datapath + nft)              kd-b (pod B)
    10.77.1.2  fd77:1::2  --veth--  10.77.1.1 | 10.77.2.1  --veth--  10.77.2.2  fd77:2::2
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import Datapath, DatapathConfig, cleanup
from otel_kzt.agent.datapath.pins import DEFAULT_PIN_ROOT
from tests.support.k8s_cluster import served_cluster  # noqa: F401 -- the API server fixture (metadata)

TRAFFIC = str(Path(__file__).with_name("traffic.py"))
PIN_ROOT = DEFAULT_PIN_ROOT
MODES = ("netfilter", "tc", "cgroup")
CGROUP2 = Path("/sys/fs/cgroup/unified")  # this machine is hybrid
NODE_DEVICES = ("kdna0", "kdnb0")  # tc mode: the node's devices (towards pod A, towards pod B)
SIOCETHTOOL, ETHTOOL_STSO, ETHTOOL_SGRO = 0x8946, 0x1F, 0x2C  # linux/sockios.h, linux/ethtool.h


@dataclass(frozen=True)
class Net:
    node: str
    pod_a: str
    pod_b: str
    a4: str = "10.77.1.2"
    b4: str = "10.77.2.2"
    a6: str = "fd77:1::2"
    b6: str = "fd77:2::2"
    node_b4: str = "10.77.2.1"

    def traffic(self, ns: str, *args: object, timeout: float = 120.0) -> dict[str, Any]:
        """Run a traffic.py command inside `ns`; returns its JSON summary."""
        proc = netns.run_in(ns, [sys.executable, TRAFFIC, *map(str, args)], timeout=timeout)
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def nft(self, script: str, ns: str | None = None) -> None:
        """Load an nftables script in the node (or `ns`): the namespace dies with its rules."""
        netns.run_in(ns or self.node, ["nft", "-f", "-"], input=script)

    def nft_counter(self, name: str, ns: str | None = None) -> tuple[int, int]:
        """(bytes, packets) of a named counter in the `inet kd` table of the node (or `ns`)."""
        out = netns.run_in(ns or self.node, ["nft", "-j", "list", "counter", "inet", "kd", name]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["bytes"]), int(item["counter"]["packets"])
        raise AssertionError(f"nft counter {name} not found: {out}")

    def segment_after_node(self, devices: tuple[str, ...] = NODE_DEVICES) -> None:
        """The node's devices send one segment per buffer: GSO packets pass the datapath's hook whole and
        are cut into segments after it, as a node's NIC does with TSO (the datapath counts segments).
        Two knobs: `gso_max_segs 1` (the stack segments whatever has more than one segment) and TSO off
        (also for a packet whose segment count is unset, SKB_GSO_DODGY)."""
        for device in devices:
            netns.ip(self.node, "link", "set", "dev", device, "gso_max_segs", "1")
            self.ethtool(self.node, device, ETHTOOL_STSO, 0)

    def one_segment_per_buffer(self) -> None:
        """The pods' TCP builds one-segment buffers (it sizes them by the route device's gso_max_segs), so
        an oracle counting buffers at the node counts what the datapath counts: segments."""
        for pod in (self.pod_a, self.pod_b):
            netns.ip(pod, "link", "set", "dev", "eth0", "gso_max_segs", "1")

    def ethtool(self, ns: str, device: str, command: int, value: int) -> None:
        """An ethtool set command (ETHTOOL_SGRO, ETHTOOL_STSO) by the ioctl itself: the machine need not
        have ethtool."""
        data = array.array("I", [command, value])
        request = struct.pack("16sP", device.encode(), data.buffer_info()[0])
        with netns.entered(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, SIOCETHTOOL, request)

    def count_received(self, ns: str, src: str, dst: str, *, match: str, name: str) -> None:
        """An nftables counter `name` (in `inet kd`) of what `ns` receives from `src` to `dst` matching
        `match`: the oracle of what reached the other end, segments and not the sender's buffers."""
        self._count(ns, "prerouting priority -300", (src, dst, match), name)

    def count_leaving_node(self, src: str, dst: str, *, match: str, name: str) -> None:
        """A counter `name` of the node's POSTROUTING (before any hook of the datapath's): the buffers as
        the node's stack sends them, GSO packets whole, before a device cuts them into segments."""
        self._count(self.node, "postrouting priority 0", (src, dst, match), name)

    def _count(self, ns: str, hook: str, what: tuple[str, str, str], name: str) -> None:
        """A counter in chain `hook` ("prerouting priority -300") of `what` (src, dst, nft match)."""
        src, dst, match = what
        ip = "ip6" if ":" in src else "ip"
        self.nft(
            f"""
            table inet kd {{
                counter {name} {{ }}
                chain {hook.split(maxsplit=1)[0]} {{
                    type filter hook {hook}; policy accept;
                    {ip} saddr {src} {ip} daddr {dst} {match} counter name {name}
                }}
            }}""",
            ns=ns,
        )

    def background(self, topo: netns.Topology, ns: str, *args: object) -> Callable[[], dict[str, Any]]:
        """Start a traffic.py command in `ns`; returns a function that waits for its JSON summary."""
        proc = netns.popen_in(ns, [sys.executable, TRAFFIC, *map(str, args)], stdout=subprocess.PIPE)

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()

        topo.on_close(f"traffic {args[0]} in {ns}", stop)

        def result() -> dict[str, Any]:
            out, _err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"traffic {args} failed"
            summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
            return summary

        return result

    def quiet_ipv6(self) -> None:
        """Switch IPv6 off in the node and the pods: their neighbour discovery and MLD packets are real
        traffic the datapath counts, which a test that accounts for every byte in the overflow bucket
        cannot tell apart from its own."""
        for iface in ("all", "default", "kdna0", "kdnb0"):
            netns.run_in(self.node, ["sysctl", "-q", "-w", f"net.ipv6.conf.{iface}.disable_ipv6=1"])
        for pod in (self.pod_a, self.pod_b):  # their own MLD reports: counted where sockets are (cgroup)
            for iface in ("all", "default", "eth0"):
                netns.run_in(pod, ["sysctl", "-q", "-w", f"net.ipv6.conf.{iface}.disable_ipv6=1"])

    def drop_udp_at(self, ns: str) -> None:
        """Drop UDP on input in `ns`: no ICMP errors flow back, so only the sent traffic is counted."""
        self.nft(
            """
            table inet kddrop {
                chain input {
                    type filter hook input priority 0; policy accept;
                    meta l4proto udp drop
                }
            }""",
            ns=ns,
        )

    def serve_tcp(self, topo: netns.Topology, ns: str, port: int) -> None:
        """A TCP sink in `ns` (IPv4 and IPv6), stopped when the topology closes."""
        proc = netns.popen_in(ns, [sys.executable, TRAFFIC, "tcp-serve", str(port)], stdout=subprocess.PIPE)

        def stop() -> None:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()

        topo.on_close(f"tcp server {ns}:{port}", stop)
        assert proc.stdout is not None
        assert b"listening" in proc.stdout.readline()


def _build(topo: netns.Topology, net: Net) -> None:
    for ns in (net.node, net.pod_a, net.pod_b):
        topo.netns(ns)
    topo.veth(
        net.node,
        "kdna0",
        net.pod_a,
        "eth0",
        a_addrs=["10.77.1.1/24", "fd77:1::1/64"],
        b_addrs=[f"{net.a4}/24", f"{net.a6}/64"],
    )
    topo.veth(
        net.node,
        "kdnb0",
        net.pod_b,
        "eth0",
        a_addrs=[f"{net.node_b4}/24", "fd77:2::1/64"],
        b_addrs=[f"{net.b4}/24", f"{net.b6}/64"],
    )
    for ns, gw4, gw6 in ((net.pod_a, "10.77.1.1", "fd77:1::1"), (net.pod_b, "10.77.2.1", "fd77:2::1")):
        topo.route(ns, "default", via=gw4)
        topo.route(ns, "default", via=gw6)
    netns.enable_forwarding(net.node)


@contextlib.contextmanager
def joined_cgroup(name: str) -> Iterator[Path]:
    """Run this process (and all it starts from now on) in a new cgroup below the cgroup2 root."""
    own = next(
        line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")
    )
    parent = CGROUP2 / own.strip().lstrip("/")  # where the test runner lives, to return there
    path = CGROUP2 / name
    path.mkdir(exist_ok=True)
    (path / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield path
    finally:
        (parent / "cgroup.procs").write_text(str(os.getpid()))
        for pid in (path / "cgroup.procs").read_text().split():  # stragglers: back to the root too
            with contextlib.suppress(OSError):
                (parent / "cgroup.procs").write_text(pid)
        path.rmdir()


@pytest.fixture
def mode(request: pytest.FixtureRequest) -> str:
    """The datapath mode of the test: `netfilter` unless parametrized (indirect=True) over `MODES`."""
    return str(getattr(request, "param", "netfilter"))


@pytest.fixture
def cgroup_root(mode: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """In cgroup mode, the cgroup the test runs in (the datapath's root); else None."""
    if mode != "cgroup":
        yield None
        return
    with joined_cgroup("kd-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40]) as path:
        yield str(path)


@pytest.fixture
def topo(cgroup_root: str | None) -> Iterator[netns.Topology]:
    with netns.Topology() as topology:
        yield topology


@pytest.fixture
def net(topo: netns.Topology) -> Net:
    result = Net(node="kd-n", pod_a="kd-a", pod_b="kd-b")
    _build(topo, result)
    return result


DatapathFactory = Callable[..., Datapath]


@pytest.fixture
def datapath(
    net: Net, mode: str, cgroup_root: str | None, request: pytest.FixtureRequest
) -> Iterator[DatapathFactory]:
    """Start datapaths attached in the node netns; all closed and their pins removed at the end."""
    started: list[Datapath] = []
    node_name = "kd-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())[
        :40
    ].strip("-")
    cleanup(node_name, PIN_ROOT)  # leftovers of a crashed run

    def start(ns: str | None = None, **overrides: Any) -> Datapath:
        """A datapath for this test's node name, attached in the node netns (or `ns`)."""
        options: dict[str, Any] = {"mode": mode, "tc_devices": NODE_DEVICES, "cgroup_root": cgroup_root}
        config = DatapathConfig(node_name=node_name, pin_root=PIN_ROOT, **{**options, **overrides})
        dp = Datapath(config)
        started.append(dp)
        with netns.entered(ns or net.node):
            dp.start()
        return dp

    try:
        yield start
    finally:
        for dp in started:
            dp.close()
        cleanup(node_name, PIN_ROOT)


def settle() -> None:
    """Packets already sent have passed POSTROUTING once the sender returned; a tiny pause covers the
    replies (ICMP errors, ACKs) generated in softirq on another CPU."""
    time.sleep(0.2)
