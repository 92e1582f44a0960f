"""The `tc` mode on a device without a link header (DESIGN §3a): a node's WireGuard or IP tunnel device
hands the stack's IP packets to its driver as they are, so at its egress the network header is where the
packet starts, not 14 bytes in (tc.c reads relative to the network header, not to skb->data). A TUN
device is such a device (this kernel has no IP tunnels or WireGuard): the node routes a prefix into it,
pod A sends there, and what the test reads from the TUN file, one IP packet per read, is the oracle: the
flow's bytes and packets equal it, IPv4 and IPv6.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import struct
from collections.abc import Iterator

import pytest

from otel_kzt import netns
from tests.kernel.conftest import NODE_DEVICES, DatapathFactory, Net, settle
from tests.kernel.test_datapath import UDP, flow, key

pytestmark = [pytest.mark.kernel, pytest.mark.parametrize("mode", ["tc"], indirect=True)]

TUN = "kdtun0"
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000  # linux/if_tun.h
BEYOND = {4: ("10.77.9.0/24", "10.77.9.2"), 6: ("fd77:9::/64", "fd77:9::2")}  # routed into the TUN
PORT, COUNT, SIZE = 5301, 12, 300


@contextlib.contextmanager
def tun_device(node: str) -> Iterator[int]:
    """A TUN device in `node`, up, with both prefixes routed into it; yields its file (non-blocking)."""
    with netns.entered(node):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TUN.encode(), IFF_TUN | IFF_NO_PI))
        except BaseException:
            os.close(fd)
            raise
    try:
        netns.ip(node, "link", "set", TUN, "up")
        for prefix, _ in BEYOND.values():
            netns.ip(node, "route", "add", prefix, "dev", TUN)
        yield fd
    finally:
        os.close(fd)  # a TUN device without IFF_TUN_PERSIST goes with its last file


def read_to(fd: int, dst: str) -> tuple[int, int]:
    """(bytes, packets) of what left through the TUN file for `dst` (the kernel's own packets, such as
    IPv6 router solicitations, are left out)."""
    want = ipaddress.ip_address(dst).packed
    total = packets = 0
    while True:
        try:
            packet = os.read(fd, 65536)
        except BlockingIOError:
            return total, packets
        version = packet[0] >> 4
        if (packet[16:20] if version == 4 else packet[24:40]) == want:
            total, packets = total + len(packet), packets + 1


@pytest.mark.parametrize("family", [4, 6])
def test_a_device_without_a_link_header_is_counted_from_its_ip_header(
    net: Net, datapath: DatapathFactory, family: int
) -> None:
    src = net.a4 if family == 4 else net.a6
    dst = BEYOND[family][1]
    with tun_device(net.node) as fd:
        dp = datapath(tc_devices=(*NODE_DEVICES, TUN))
        read_to(fd, dst)  # nothing of the flow yet: what the kernel sent on its own
        net.traffic(net.pod_a, "udp", dst, PORT, COUNT, SIZE)
        settle()
        left = read_to(fd, dst)
        assert left == (COUNT * (SIZE + 8 + (20 if family == 4 else 40)), COUNT)
        got = flow(dp.snapshot(), key(src, dst, UDP, dport=PORT))
        assert (got.bytes, got.packets) == left
