"""tc's fast paths (tc.c's kzt_fast4 and kzt_fast6) count every packet exactly as the full path does,
and each device's flags (tc.py DeviceConfig, read per packet) choose the path.

The tc counter is built as the agent builds it, without the write-combining slots so that each packet
lands in the flow map at once, and its device's flags are written as the agent writes them (the test run's
device is lo, ifindex 1):
- `fast`: an Ethernet uplink where VXLAN is counted inside (DEV_ETHER | DEV_INNER), as shipped;
- `full`: the same flags, built with -DKZT_TC_NO_FAST (every packet through count.h's full path);
- `helper`: DEV_INNER only, as for a device without Ethernet headers (no fast path, no direct header copy:
  every read through the helper), written to tcdev_more because another device holds its array slot;
- `outer`: DEV_ETHER only, as where an overlay device was hooked at the start: VXLAN counted as it is.
Each frame of a corpus, the fast path's cases and every edge that must leave it, is test-run once through
each (BPF_PROG_TEST_RUN, with the GSO fields set in the __sk_buff context as the stack leaves them). The
first three flow maps and event counters must be equal, entry for entry; `outer` differs in the VXLAN
packet only; a few entries are checked against values worked out by hand. Real traffic through the fast
path is tests/kernel's tc exactness suites.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from otel_kzt.agent import config
from otel_kzt.agent.datapath import bpfsys, devices, flowtables, probe, tc
from otel_kzt.agent.datapath.bpfmap import BpfMap
from otel_kzt.agent.datapath.btf import KIND_STRUCT, kernel_btf

pytestmark = pytest.mark.kernel

NO_FAST = "-DKZT_TC_NO_FAST"
DST, DST6 = "10.78.0.1", "fd78::1"
UDP, TCP = 17, 6


def _ip4(src: str, proto: int, l4: bytes, *, ihl: int = 5, frag: int = 0, pad: int = 0) -> bytes:
    """An IPv4 packet (checksum left 0: nothing on this path checks it), `pad` bytes of trailer after it."""
    options = b"\x01" * (4 * (ihl - 5))  # NOPs
    total = 20 + len(options) + len(l4)
    head = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(DST))  # fmt: skip
    return head + options + l4 + b"\0" * pad


def _ip6(src: str, nexthdr: int, l4: bytes, *, ext: bytes = b"", pad: int = 0) -> bytes:
    """An IPv6 packet, `ext` its extension headers (their first's type is `nexthdr`), `pad` trailer bytes."""
    addresses = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, DST6)
    head = struct.pack(">IHBB", 0x6000_0000, len(ext) + len(l4), nexthdr, 64) + addresses
    return head + ext + l4 + b"\0" * pad


def _udp(sport: int, dport: int, payload: int) -> bytes:
    return struct.pack(">HHHH", sport, dport, 8 + payload, 0) + b"u" * payload


def _tcp(sport: int, dport: int, payload: int, *, doff: int = 5) -> bytes:
    options = b"\x01" * (4 * (doff - 5))
    return (
        struct.pack(">HHIIBBHHH", sport, dport, 1, 1, doff << 4, 0x10, 65535, 0, 0) + options + b"t" * payload
    )


def _frame(ip: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + struct.pack(">H", ethertype) + ip


def _vxlan(inner_src: str) -> bytes:
    """A VXLAN packet to the IANA port around a pod's 64-byte UDP datagram (counted as the inner one)."""
    inner = _frame(_ip4(inner_src, UDP, _udp(40_000, 8080, 64)))
    return _udp(50_000, 4789, 8 + len(inner))[:8] + b"\x08\0\0\0\0\0\x01\0" + inner


# (frame, gso_size, gso_segs): each from its own source address, so each is one flow of its own.
def _corpus() -> Iterator[tuple[bytes, int, int]]:
    n = iter(range(1, 250))
    src = lambda: f"10.78.1.{next(n)}"  # noqa: E731
    # the fast path's own: TCP and UDP, every port rule, TCP GSO with its count given or derived
    for sport, dport in ((40_000, 8080), (53, 40_001), (40_000, 50_000), (443, 80), (80, 80), (0, 0)):
        yield _frame(_ip4(src(), UDP, _udp(sport, dport, 64))), 0, 0
        yield _frame(_ip4(src(), TCP, _tcp(sport, dport, 0, doff=8))), 0, 0
    yield _frame(_ip4(src(), UDP, _udp(40_000, 8472, 64))[:-64] + b"x" * 64), 0, 0  # 8472 but not VXLAN
    yield _frame(_ip4(src(), TCP, _tcp(45_000, 5201, 0), frag=0x2000)), 0, 0  # first fragment (MF)
    for doff in (5, 8, 15):
        for payload, gso_size, segs in ((3000, 500, 6), (3000, 500, 0), (2001, 500, 0), (500, 500, 0),
                                        (400, 500, 0), (1000, 1000, 1), (1200, 100, 2)):  # fmt: skip
            yield _frame(_ip4(src(), TCP, _tcp(45_000, 5201, payload, doff=doff))), gso_size, segs
    # the full path's: options, a later fragment, padding, other protocols, UDP GSO, VXLAN, IPv6, not IP
    yield _frame(_ip4(src(), UDP, _udp(40_000, 8080, 64), ihl=6)), 0, 0
    yield _frame(_ip4(src(), UDP, _udp(40_000, 8080, 64), frag=0x0010)), 0, 0
    yield _frame(_ip4(src(), UDP, _udp(40_000, 8080, 10), pad=8)), 0, 0
    yield _frame(_ip4(src(), 1, b"\x08\0\0\0\0\x01\0\x01" + b"p" * 56)), 0, 0
    yield _frame(_ip4(src(), 132, _udp(40_000, 38_412, 40))), 0, 0
    yield _frame(_ip4(src(), UDP, _udp(40_000, 8080, 3000))), 1000, 3
    yield _frame(_ip4(src(), UDP, _udp(40_000, 8080, 3000))), 1000, 0
    yield _frame(_ip4(src(), UDP, _vxlan(src()))), 0, 0
    yield _frame(_ip4(src(), UDP, _udp(40_000, 8080, 64)), ethertype=0x86DD), 0, 0
    yield _frame(b"\x60\0\0\0\0\x48\x11\x40" + b"\xfd" + b"\0" * 14 + b"\x01" + b"\xfd" + b"\0" * 14 + b"\x02"
                 + _udp(40_000, 8080, 64), ethertype=0x86DD), 0, 0  # fmt: skip
    yield _frame(b"\0" * 46, ethertype=0x0806), 0, 0
    # IPv6: the same cases without extension headers, then every edge that must leave a fast path
    m = iter(range(1, 250))
    src6 = lambda: f"fd78:1::{next(m):x}"  # noqa: E731
    for sport, dport in ((40_000, 8080), (53, 40_001), (443, 80), (0, 0)):
        yield _frame(_ip6(src6(), UDP, _udp(sport, dport, 64)), 0x86DD), 0, 0
        yield _frame(_ip6(src6(), TCP, _tcp(sport, dport, 0, doff=8)), 0x86DD), 0, 0
    for doff in (5, 8, 15):
        for payload, gso_size, segs in ((3000, 500, 6), (3000, 500, 0), (2001, 500, 0), (400, 500, 0),
                                        (1200, 100, 2)):  # fmt: skip
            yield _frame(_ip6(src6(), TCP, _tcp(45_000, 5201, payload, doff=doff)), 0x86DD), gso_size, segs
    dstopts = bytes([UDP, 0, 1, 4, 0, 0, 0, 0])  # next header UDP, 8 bytes, PadN
    yield _frame(_ip6(src6(), 60, _udp(40_000, 8080, 64), ext=dstopts), 0x86DD), 0, 0
    fragment = bytes([UDP, 0, 0, 1, 0, 0, 0, 7])  # next header UDP, offset 0, more fragments
    yield _frame(_ip6(src6(), 44, _udp(40_000, 8080, 64), ext=fragment), 0x86DD), 0, 0
    later = bytes([UDP, 0, 0, 0x10, 0, 0, 0, 8])  # offset 2 (16 bytes): a later fragment, no ports
    yield _frame(_ip6(src6(), 44, b"l" * 32, ext=later), 0x86DD), 0, 0
    yield _frame(_ip6(src6(), UDP, _udp(40_000, 8080, 10), pad=8), 0x86DD), 0, 0
    yield _frame(_ip6(src6(), 58, b"\x80\0\0\0\0\x01\0\x01" + b"p" * 56), 0x86DD), 0, 0
    yield _frame(_ip6(src6(), UDP, _udp(40_000, 8080, 3000)), 0x86DD), 1000, 3
    yield _frame(_ip6(src6(), UDP, _vxlan(src())), 0x86DD), 0, 0  # VXLAN over an IPv6 underlay
    yield _frame(_ip6(src6(), UDP, _udp(40_000, 8080, 64)), 0x0800), 0, 0  # IPv6 typed IPv4


LO = 1  # the test run's device


class Counter:
    """tc's kzt_count built by bcc as the agent would, less the slots; lo's flags written as the agent
    writes a device's (`taken`: another device holds lo's array slot)."""

    def __init__(self, extra: list[str], flags: int, *, taken: bool = False) -> None:
        from bcc import BPF

        owner = tc.TcMode(["kdfast0"])
        owner.hooked = [devices.Device("kdfast0", LO, "veth", "explicit", ether=True)]
        features = probe.probe(owner)
        cflags = probe.flow_cflags(
            features, map_size=4096, ephemeral_min=config.DEFAULT_EPHEMERAL[0],
            ephemeral_max=config.DEFAULT_EPHEMERAL[1], evict_batch=flowtables.EVICT_BATCH,
            dying_size=flowtables.DYING_SIZE, pin_dir=None,
        )  # fmt: skip
        self.bpf = BPF(
            text=probe.program_text(owner).encode(), cflags=[f for f in cflags if f != "-DKZT_WC"] + extra
        )
        self.fd = int(self.bpf.load_func(b"kzt_count", tc.BPF_PROG_TYPE_SCHED_CLS).fd)
        maps = (BpfMap(os.dup(self.bpf[n.encode()].map_fd), n) for n in tc.DEV_MAPS)
        dev = tc.DeviceConfig(*maps)
        try:
            if taken:
                dev.set(LO + tc.DEV_SLOTS, tc.DEV_ETHER | tc.DEV_INNER)
            dev.set(LO, flags)
            assert dev.get(LO) == flags
            assert len(self.bpf[b"tcdev_more"].items()) == taken
        finally:
            dev.close()

    def flows(self) -> dict[tuple[int, int, int, str, str], tuple[int, int]]:
        out = {}
        for k, v in self.bpf[b"flows4"].items():
            raw = bytes(k)
            proto, side, port = struct.unpack_from("<BBH", raw)
            out[(proto, side, port, socket.inet_ntoa(raw[4:8]), socket.inet_ntoa(raw[8:12]))] = (
                v.bytes,
                v.packets,
            )
        return out

    def flows6(self) -> dict[tuple[int, int, int, str, str], tuple[int, int]]:
        out = {}
        for k, v in self.bpf[b"flows6"].items():
            raw = bytes(k)
            proto, side, port = struct.unpack_from("<BBH", raw)
            src, dst = (socket.inet_ntop(socket.AF_INET6, raw[i : i + 16]) for i in (4, 20))
            out[(proto, side, port, src, dst)] = (v.bytes, v.packets)
        return out

    def events(self) -> list[int]:
        stats = self.bpf[b"stats"]
        return [sum(stats[ctypes.c_uint32(i)]) for i in range(len(stats))]


def _test_run(fd: int, frame: bytes, ctx: bytes) -> None:
    data = ctypes.create_string_buffer(frame, len(frame))
    skb = ctypes.create_string_buffer(ctx, len(ctx))
    # test: prog_fd, retval, data_size_in/out, data_in/out, repeat, duration, ctx_size_in/out, ctx_in/out
    attr = bpfsys.pack_attr("<IIIIQQIIIIQQ", fd, 0, len(frame), 0, bpfsys.address(data), 0, 1, 0,
                            len(ctx), 0, bpfsys.address(skb), 0)  # fmt: skip
    bpfsys.bpf(bpfsys.BPF_PROG_TEST_RUN, attr, "test-run tc counter")
    assert struct.unpack_from("<i", attr, 4)[0] == -1  # TC_ACT_UNSPEC: never a verdict of ours


def test_the_fast_path_counts_what_the_full_path_counts() -> None:
    btf = kernel_btf()
    size = btf.size_of(btf.find(KIND_STRUCT, "__sk_buff") or 0)
    segs_at, _ = btf.field("__sk_buff", "gso_segs")
    size_at, _ = btf.field("__sk_buff", "gso_size")
    inner = tc.DEV_ETHER | tc.DEV_INNER
    fast, full = Counter([], inner), Counter([NO_FAST], inner)
    helper = Counter([], tc.DEV_INNER, taken=True)
    outer, outer_full = Counter([], tc.DEV_ETHER), Counter([NO_FAST], tc.DEV_ETHER)
    counters = (fast, full, helper, outer, outer_full)
    try:
        corpus = list(_corpus())
        for frame, gso_size, gso_segs in corpus:
            ctx = bytearray(size)
            struct.pack_into("<I", ctx, segs_at, gso_segs)
            struct.pack_into("<I", ctx, size_at, gso_size)
            for counter in counters:
                _test_run(counter.fd, frame, bytes(ctx))
        got, got6 = fast.flows(), fast.flows6()
        for other in (full, helper):
            assert (other.flows(), other.flows6(), other.events()) == (got, got6, fast.events())
        assert (outer.flows(), outer.flows6(), outer.events()) == (
            outer_full.flows(), outer_full.flows6(), outer_full.events()
        )  # fmt: skip
        # without DEV_INNER, VXLAN is counted as it is: the tunnel's flow (UDP to 4789: 20 + 8 + 8 + the
        # 106-byte inner frame), not the inner one; the datagram to 8472 that is no VXLAN of IP a flow
        vxlan_inner, vxlan_outer = (UDP, 2, 8080, "10.78.1.44", DST), (UDP, 2, 4789, "10.78.1.43", DST)
        assert vxlan_inner not in outer.flows() and outer.flows()[vxlan_outer] == (142, 1)
        assert outer.flows()[(UDP, 2, 8472, "10.78.1.13", DST)] == (20 + 8 + 64, 1)
        assert outer.events()[2] == fast.events()[2] - 1
        # by hand: a 64-byte datagram to a listening port; a TCP ACK with options from one; TCP GSO of
        # 3000 bytes in segments of 500 with 12 bytes of options: 6 segments, each repeating 20 + 32
        assert got[(UDP, 2, 8080, "10.78.1.1", DST)] == (20 + 8 + 64, 1)
        assert got[(TCP, 1, 53, "10.78.1.4", DST)] == (20 + 32, 1)
        assert got[(TCP, 2, 5201, "10.78.1.22", DST)] == (20 + 32 + 3000 + 5 * (20 + 32), 6)  # segs given
        assert got[(TCP, 2, 5201, "10.78.1.23", DST)] == (20 + 32 + 3000 + 5 * (20 + 32), 6)  # derived
        assert got[vxlan_inner] == (20 + 8 + 64, 1)  # the VXLAN packet's inner one
        assert got6[(UDP, 2, 8080, "fd78:1::1", DST6)] == (40 + 8 + 64, 1)
        assert got6[(TCP, 2, 5201, "fd78:1::e", DST6)] == (40 + 32 + 3000 + 5 * (40 + 32), 6)
        assert got6[(TCP, 2, 5201, "fd78:1::f", DST6)] == (40 + 32 + 3000 + 5 * (40 + 32), 6)  # derived
        assert got6[(UDP, 2, 8080, "fd78:1::18", DST6)] == (40 + 8 + 8 + 64, 1)  # destination options
        # every frame counted once: as a flow of its own, or not IP (KZT_STAT_NOT_IP)
        assert len(got) + len(got6) + fast.events()[2] == len(corpus)
    finally:
        for counter in counters:
            counter.bpf.cleanup()
