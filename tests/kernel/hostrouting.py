"""eBPF host routing for kernel tests: forwarding between pods that never passes netfilter.

What Cilium's eBPF host routing does, reduced to its core: a program at the tc ingress of the pod's
host-side veth sends IPv4 packets for another pod straight to that pod's veth with `bpf_redirect_neigh`
(the kernel fills in the MAC addresses from its FIB and neighbour table). The packet skips the IP layer
of the node: no PREROUTING, FORWARD or POSTROUTING, so a netfilter hook never sees it, while the veth
interface counters do. The program is a handful of raw instructions (no compiler), attached as a tcx
ingress link that is gone when its fd is closed.

Also a CNI's own egress program (`egress_program`, `drop_ipv4_udp_program`), for the `tc` mode's
promise to run first and leave the CNI's verdict alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

from otel_kzt import netns
from otel_kzt.agent.datapath import bpfsys

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47
BPF_FUNC_REDIRECT_NEIGH = 152
TCX_NEXT, TC_ACT_SHOT = -1, 2


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _ipv4_or_pass(skb: int, rest: int) -> list[bytes]:
    """r2 = the Ethernet header of an IPv4 packet whose header is in reach (r3 = data_end); anything else
    jumps to the `pass` label, `rest` instructions after these seven."""
    return [
        _insn(0x61, dst=2, src=skb, off=76),  # r2 = skb->data
        _insn(0x61, dst=3, src=skb, off=80),  # r3 = skb->data_end
        _insn(0xBF, dst=4, src=2),  # r4 = data
        _insn(0x07, dst=4, imm=34),  # r4 += Ethernet + IPv4 header
        _insn(0x2D, dst=4, src=3, off=2 + rest),  # if r4 > data_end: pass
        _insn(0x69, dst=5, src=2, off=12),  # r5 = ethertype
        _insn(0x55, dst=5, off=rest, imm=0x0008),  # if r5 != htons(ETH_P_IP): pass
    ]


def redirect_program(destination: str, ifindex: int) -> bytes:
    """IPv4 to `destination`: bpf_redirect_neigh(ifindex); anything else: TCX_NEXT (the stack as usual)."""
    daddr = struct.unpack("<i", ipaddress.IPv4Address(destination).packed)[0]  # as loaded from the packet
    return b"".join(
        [
            _insn(0xBF, dst=6, src=1),  # r6 = skb
            *_ipv4_or_pass(skb=6, rest=8),
            _insn(0x61, dst=5, src=2, off=30),  # r5 = daddr
            _insn(0x56, dst=5, off=6, imm=daddr),  # if (u32) r5 != destination: pass
            _insn(0xB7, dst=1, imm=ifindex),  # bpf_redirect_neigh(ifindex, NULL, 0, 0)
            _insn(0xB7, dst=2),
            _insn(0xB7, dst=3),
            _insn(0xB7, dst=4),
            _insn(0x85, imm=BPF_FUNC_REDIRECT_NEIGH),
            _insn(0x95),  # return its verdict (TC_ACT_REDIRECT)
            _insn(0xB7, dst=0, imm=TCX_NEXT),  # pass:
            _insn(0x95),
        ]
    )


def drop_ipv4_udp_program() -> bytes:
    """What a CNI's egress program may decide: IPv4 UDP is dropped (TC_ACT_SHOT); anything else TCX_NEXT."""
    return b"".join(
        [
            *_ipv4_or_pass(skb=1, rest=4),
            _insn(0x71, dst=5, src=2, off=23),  # r5 = IPv4 protocol
            _insn(0x55, dst=5, off=2, imm=17),  # if r5 != UDP: pass
            _insn(0xB7, dst=0, imm=TC_ACT_SHOT),
            _insn(0x95),
            _insn(0xB7, dst=0, imm=TCX_NEXT),  # pass:
            _insn(0x95),
        ]
    )


def load(program: bytes, name: str, attach_type: int = BPF_TCX_INGRESS) -> int:
    insns = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version, prog_flags,
    # prog_name[16], prog_ifindex, expected_attach_type
    attr = bpfsys.pack_attr(
        "<IIQQIIQII",
        BPF_PROG_TYPE_SCHED_CLS,
        len(program) // 8,
        bpfsys.address(insns),
        bpfsys.address(license_),
        1,
        len(log),
        bpfsys.address(log),
        0,
        0,
    )
    struct.pack_into("<16sII", attr, 48, name.encode()[:15], 0, attach_type)
    try:
        return bpfsys.bpf(BPF_PROG_LOAD, attr, f"load {name}")
    except bpfsys.BpfCallError as exc:
        raise bpfsys.BpfCallError(f"{exc}: {log.value.decode(errors='replace')}", exc.errno) from exc


def attach(prog_fd: int, ifindex: int, device: str, attach_type: int = BPF_TCX_INGRESS) -> int:
    """A tcx link, appended after the device's programs of that direction (no ordering flags)."""
    attr = bpfsys.pack_attr("<IIIIIIQ", prog_fd, ifindex, attach_type, 0, 0, 0, 0)
    return bpfsys.bpf(bpfsys.BPF_LINK_CREATE, attr, f"attach tcx program to {device}")


@contextlib.contextmanager
def egress_program(ns: str, device: str, program: bytes, name: str) -> Iterator[None]:
    """`program` at the tcx egress of `device` in netns `ns` while the block runs."""
    prog = load(program, name, BPF_TCX_EGRESS)
    try:
        with netns.entered(ns):
            link = attach(prog, socket.if_nametoindex(device), device, BPF_TCX_EGRESS)
        try:
            yield
        finally:
            os.close(link)
    finally:
        os.close(prog)


@contextlib.contextmanager
def host_routing(routes: list[tuple[str, str, str]]) -> Iterator[None]:
    """In the current network namespace, for each (ingress device, destination pod, its device): packets
    arriving from the first device for the pod go straight to its device. Undone on exit."""
    fds: list[int] = []
    try:
        for ingress, destination, egress in routes:
            prog = load(redirect_program(destination, socket.if_nametoindex(egress)), "kd_hostroute")
            fds.append(prog)
            fds.append(attach(prog, socket.if_nametoindex(ingress), ingress))
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)
