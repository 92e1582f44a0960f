"""otel_kzt.netns on the real kernel: what Topology creates it removes, also when the body raises;
`entered` switches the calling thread's namespace and always switches back."""

from __future__ import annotations

import os

import pytest

from otel_kzt import netns

pytestmark = pytest.mark.kernel


def _link_exists(ns: str | None, ifname: str) -> bool:
    return netns.run_in(ns, ["ip", "link", "show", ifname], check=False).returncode == 0


def test_topology_undoes_everything_even_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), netns.Topology() as topo:
        topo.netns("kd-t1")
        topo.veth(None, "kdt1r", "kd-t1", "eth0", a_addrs=["10.79.0.1/30"], b_addrs=["10.79.0.2/30"])
        assert netns.netns_exists("kd-t1") and _link_exists(None, "kdt1r")
        raise RuntimeError("boom")
    assert not netns.netns_exists("kd-t1")
    assert not _link_exists(None, "kdt1r")


def test_routed_pair_talks_over_ipv4_and_ipv6() -> None:
    with netns.Topology() as topo:
        topo.netns("kd-t2a")
        topo.netns("kd-t2b")
        topo.netns("kd-t2r")
        topo.veth(
            "kd-t2r",
            "kdt2ra",
            "kd-t2a",
            "eth0",
            a_addrs=["10.79.1.1/24", "fd79:1::1/64"],
            b_addrs=["10.79.1.2/24", "fd79:1::2/64"],
        )
        topo.veth(
            "kd-t2r",
            "kdt2rb",
            "kd-t2b",
            "eth0",
            a_addrs=["10.79.2.1/24", "fd79:2::1/64"],
            b_addrs=["10.79.2.2/24", "fd79:2::2/64"],
        )
        for ns, gw4, gw6 in (("kd-t2a", "10.79.1.1", "fd79:1::1"), ("kd-t2b", "10.79.2.1", "fd79:2::1")):
            topo.route(ns, "default", via=gw4)
            topo.route(ns, "default", via=gw6)
        netns.enable_forwarding("kd-t2r")
        script = (
            "import socket, sys\n"
            "for fam, dst in ((socket.AF_INET, '10.79.2.2'), (socket.AF_INET6, 'fd79:2::2')):\n"
            "    s = socket.socket(fam, socket.SOCK_DGRAM)\n"
            "    s.connect((dst, 9)); s.send(b'x')\n"
            "    s.settimeout(2)\n"
            "    try:\n"
            "        s.recv(1)\n"
            "    except ConnectionRefusedError:\n"
            "        print('refused', fam)\n"
        )
        out = netns.run_in("kd-t2a", ["python3", "-c", script]).stdout
        # Port 9 is closed on B: the ICMP "port unreachable" coming back proves the round trip.
        assert out.count("refused") == 2


def test_entered_switches_and_returns() -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    with netns.Topology() as topo:
        topo.netns("kd-t3")
        target = os.stat(netns.netns_path("kd-t3")).st_ino
        with netns.entered("kd-t3"):
            assert os.stat("/proc/thread-self/ns/net").st_ino == target
        assert os.stat("/proc/thread-self/ns/net").st_ino == own
        with pytest.raises(ValueError), netns.entered("kd-t3"):
            raise ValueError("inside")
        assert os.stat("/proc/thread-self/ns/net").st_ino == own


def test_long_interface_name_is_refused() -> None:
    with pytest.raises(netns.NetnsError, match="longer than 15"):
        netns.create_veth(None, "kd-much-too-long-name", None, "kdx")
