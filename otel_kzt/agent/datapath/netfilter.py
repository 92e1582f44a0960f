"""The `netfilter` mode: the counter at netfilter POSTROUTING just after source NAT (Linux >= 6.4).

After source NAT, because only there does the hook know that this node's NAT made the node the source of a
forwarded packet (the NodePort / LoadBalancer hop with externalTrafficPolicy Cluster); the source the
packet had before NAT comes from conntrack, so a masqueraded pod is still counted as the pod (bpf/origin.h).

bcc 0.26 predates netfilter BPF programs: it loads one (`load_func(name, 32, attach_type=45)`) but cannot
attach it, so the links are made here with raw `BPF_LINK_CREATE`. One link per family (IPv4, IPv6), each
running the dispatcher. A pinned link is adopted only when it runs the current dispatcher in the calling
thread's network namespace (the loader decides, comparing what it recorded in the pinned `meta` map);
otherwise a new link is attached first and the old one detached after, so for a moment both run (a packet
may be counted twice) rather than neither (a packet missed).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
from pathlib import Path

from otel_kzt.agent.datapath import bpfsys, kfunc
from otel_kzt.agent.datapath.bpfsys import ENOTSUPP, BpfCallError
from otel_kzt.agent.datapath.btf import KIND_STRUCT, Btf
from otel_kzt.agent.datapath.kfunc import EXIT, LDX_B, LDX_DW, MOV_K, insn
from otel_kzt.agent.datapath.mode import field_offset
from otel_kzt.errors import KernelUnsupported, PrivilegeError

log = logging.getLogger(__name__)

BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
NF_INET_POST_ROUTING = 4
NF_IP_PRI_NAT_SRC = 100
LINK_PRIORITY = NF_IP_PRI_NAT_SRC + 1  # just after source NAT (bpf/origin.h restores the source before it)
LINK_PRIORITIES = (LINK_PRIORITY, LINK_PRIORITY + 1)  # a replacement takes the other one
LINK_NAMES = {NFPROTO_IPV4: "link_v4", NFPROTO_IPV6: "link_v6"}
# struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff *skb; } when BTF lacks it.
DEFAULT_CTX_SKB_OFFSET = 8


def link_create_netfilter(prog_fd: int, pf: int, priority: int, hooknum: int = NF_INET_POST_ROUTING) -> int:
    """Attach a netfilter program in the calling thread's network namespace; returns the link fd."""
    # link_create: prog_fd, target_fd, attach_type, flags, then (at 16) netfilter {pf, hooknum, prio, flags}
    attr = bpfsys.pack_attr("<IIIIIIiI", prog_fd, 0, BPF_NETFILTER, 0, pf, hooknum, priority, 0)
    try:
        return bpfsys.bpf(
            bpfsys.BPF_LINK_CREATE, attr, f"attach netfilter program (pf={pf}, priority={priority})"
        )
    except BpfCallError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
            raise KernelUnsupported(
                f"kernel refused a netfilter BPF link (pf={pf}, priority={priority}): {exc}; "
                "Linux >= 6.4 with CONFIG_NETFILTER_BPF_LINK is needed"
            ) from exc
        raise


def attach_or_adopt(dispatch_fd: int, pf: int, path: str | None, *, adopt: bool) -> int:
    """A link fd for `pf` running the dispatcher; `path` is its pin (None: not pinned)."""
    old_fd = -1
    if path is not None:
        with contextlib.suppress(FileNotFoundError):  # nothing pinned yet: a first start
            old_fd = bpfsys.obj_get(path)
    old_priority = bpfsys.link_info(old_fd).priority if old_fd >= 0 else None
    if old_fd >= 0 and adopt and old_priority in LINK_PRIORITIES:  # else: an older agent's place
        log.info("link adopted pin=%s", path)
        return old_fd
    priority = LINK_PRIORITY
    if old_priority == LINK_PRIORITY:
        priority = LINK_PRIORITY + 1  # the kernel refuses two links at one (pf, hook, priority)
    fd = link_create_netfilter(dispatch_fd, pf, priority)
    if old_fd >= 0 and path is not None:
        bpfsys.link_detach(old_fd)
        os.close(old_fd)
        os.unlink(path)
    if path is not None:
        bpfsys.obj_pin(fd, path)
    log.info("link attached pf=%d priority=%d pin=%s", pf, priority, path)
    return fd


def origin_cflags(btf: Btf) -> list[str]:
    """The offsets bpf/origin.h reads: skb->sk, IPCB/IP6CB flags in skb->cb, and conntrack (skb->_nfct,
    nf_conn's status and tuples). A kernel without conntrack in its BTF gets no KZT_OFF_CT_* (no NAT can
    have happened): the packet's own source is used."""
    flags = [
        f"-DKZT_OFF_SKB_SK={field_offset(btf, 'sk_buff', 'sk', 8)}",
        f"-DKZT_OFF_SKB_CB={btf.field('sk_buff', 'cb')[0]}",
        f"-DKZT_OFF_IPCB_FLAGS={field_offset(btf, 'inet_skb_parm', 'flags', 2)}",
        f"-DKZT_OFF_IP6CB_FLAGS={field_offset(btf, 'inet6_skb_parm', 'flags', 2)}",
        f"-DKZT_OFF_IP6CB_IIF={field_offset(btf, 'inet6_skb_parm', 'iif', 4)}",
    ]
    if not btf.has_type(KIND_STRUCT, "nf_conn"):
        log.info("kernel BTF has no conntrack: sources are taken as the packets carry them")
        return flags
    tuplehash = btf.find(KIND_STRUCT, "nf_conntrack_tuple_hash")
    assert tuplehash is not None  # nf_conn holds two
    src = (
        btf.field("nf_conn", "tuplehash")[0]
        + btf.field("nf_conntrack_tuple_hash", "tuple")[0]
        + btf.field("nf_conntrack_tuple", "src")[0]
        + field_offset(btf, "nf_conntrack_man", "u3", 16)
    )
    return [
        *flags,
        f"-DKZT_OFF_SKB_NFCT={field_offset(btf, 'sk_buff', '_nfct', 8)}",
        f"-DKZT_OFF_CT_STATUS={field_offset(btf, 'nf_conn', 'status', 8)}",
        f"-DKZT_OFF_CT_TUPLE_SRC={src}",
        f"-DKZT_OFF_CT_MAN_PORT={field_offset(btf, 'nf_conntrack_man', 'u', 2)}",
        f"-DKZT_CT_TUPLEHASH_SIZE={btf.size_of(tuplehash)}",
        f"-DKZT_IPS_SRC_NAT={btf.enum_value('ip_conntrack_status', 'IPS_SRC_NAT') or 16}",
        f"-DKZT_IPS_DST_NAT={btf.enum_value('ip_conntrack_status', 'IPS_DST_NAT') or 32}",
    ]


def wire_cflags(btf: Btf) -> list[str]:
    """The offsets behind what leaves for a packet (netfilter.c's kzt_wire_info): the output device's
    MTU, skb_shared_info's GSO fields, the inner transport header of tunnel GSO, conntrack's largest
    reassembled fragment (frag_max_size in IPCB/IP6CB, which live in skb->cb: KZT_OFF_SKB_CB is
    origin_cflags')."""
    gso_size = field_offset(btf, "skb_shared_info", "gso_size", 2)
    if field_offset(btf, "skb_shared_info", "gso_segs", 2) != gso_size + 2:
        raise KernelUnsupported("kernel BTF: skb_shared_info.gso_segs does not follow gso_size")
    _cb, cb_size = btf.field("sk_buff", "cb")
    ipcb = field_offset(btf, "inet_skb_parm", "frag_max_size", 2)
    ip6cb = field_offset(btf, "inet6_skb_parm", "frag_max_size", 2)
    if max(ipcb, ip6cb) + 2 > cb_size:
        raise KernelUnsupported("kernel BTF: frag_max_size lies outside sk_buff.cb")
    return [
        f"-DKZT_OFF_STATE_OUT={field_offset(btf, 'nf_hook_state', 'out', 8)}",
        f"-DKZT_OFF_STATE_PF={field_offset(btf, 'nf_hook_state', 'pf', 1)}",
        f"-DKZT_OFF_DEV_MTU={field_offset(btf, 'net_device', 'mtu', 4)}",
        f"-DKZT_OFF_SKB_END={field_offset(btf, 'sk_buff', 'end', 4)}",
        f"-DKZT_OFF_SKB_INNER_TH={field_offset(btf, 'sk_buff', 'inner_transport_header', 2)}",
        f"-DKZT_OFF_IPCB_FRAG_MAX={ipcb}",
        f"-DKZT_OFF_IP6CB_FRAG_MAX={ip6cb}",
        f"-DKZT_OFF_SHINFO_GSO_SIZE={gso_size}",
        f"-DKZT_OFF_SHINFO_GSO_TYPE={field_offset(btf, 'skb_shared_info', 'gso_type', 4)}",
    ]


def _probe(insns: list[bytes], name: str) -> bool:
    """Whether the kernel loads a netfilter program of these instructions (False without root)."""
    try:
        fd = bpfsys.prog_load(BPF_PROG_TYPE_NETFILTER, b"".join(insns), BPF_NETFILTER, name)
    except (BpfCallError, PrivilegeError) as exc:
        log.debug("probe %s refused: %s", name, exc)
        return False
    os.close(fd)
    return True


@functools.cache
def direct_reads(ctx_skb: int, skb_head: int) -> bool:
    """Linux >= 6.17: a pointer to a non-struct type read from a BTF object (skb->head) may be
    dereferenced, with fault-safe loads, instead of probe reads (~10 ns each)."""
    return _probe(
        [
            insn(LDX_DW, dst=2, src=1, off=ctx_skb),  # r2 = ctx->skb (trusted sk_buff)
            insn(LDX_DW, dst=2, src=2, off=skb_head),  # r2 = skb->head
            insn(LDX_B, dst=0, src=2),  # r0 = *(u8 *)r2: refused where r2 is a number
            insn(MOV_K, imm=1),
            insn(EXIT),
        ],
        "kzt_probe_mem",
    )


@functools.cache
def rdonly_cast(cast_id: int, struct_id: int) -> bool:
    """Whether netfilter programs may call the kfunc bpf_rdonly_cast (Linux >= 6.2, JIT on)."""
    return _probe(
        [
            insn(MOV_K, dst=1),
            insn(MOV_K, dst=2, imm=struct_id),
            insn(kfunc.BPF_CALL, src=kfunc.BPF_PSEUDO_KFUNC_CALL, imm=cast_id),
            insn(MOV_K, imm=1),
            insn(EXIT),
        ],
        "kzt_probe_cast",
    )


def read_cflags(btf: Btf, ctx_skb: int) -> list[str]:
    """How netfilter.c reads kernel memory that BTF does not type for the verifier: the header prefix
    and skb_shared_info (behind skb->head), conntrack's entry (behind skb->_nfct, a number). Plain loads
    where the kernel takes them (KZT_DIRECT_MEM; conntrack through bpf_rdonly_cast, which the verifier
    turns into a move: KZT_KFUNC_RDONLY_CAST), else probe reads; each measured ~10 ns a packet. Without
    root (`--print-bpf` may run so) nothing can be probed: the probe-read form."""
    flags = []
    if direct_reads(ctx_skb, field_offset(btf, "sk_buff", "head", 8)):
        flags.append("-DKZT_DIRECT_MEM")
    cast = kfunc.ids(btf).get(kfunc.placeholder("bpf_rdonly_cast"))
    nf_conn = btf.find(KIND_STRUCT, "nf_conn")
    if cast is not None and nf_conn is not None and rdonly_cast(cast, nf_conn):
        flags.append(f"-DKZT_KFUNC_RDONLY_CAST={kfunc.placeholder('bpf_rdonly_cast')}")
        flags.append(f"-DKZT_BTF_NF_CONN={nf_conn}")
    log.debug("netfilter reads: %s", flags or "probe reads")
    return flags


def kernel_release() -> tuple[int, int]:
    """The running kernel's major and minor version."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class NetfilterMode:
    """What the shared core needs from this mode (`mode.Mode`)."""

    name = "netfilter"
    entry = "netfilter.c"
    prog_type = BPF_PROG_TYPE_NETFILTER
    attach_type = BPF_NETFILTER
    link_names = tuple(LINK_NAMES.values())
    test_run_function = "bpf_prog_test_run_nf"  # Linux >= 6.6

    @property
    def runs_on_one_cpu(self) -> bool:
        """Linux >= 6.17 runs netfilter programs with migration disabled (bpf_prog_run_pin_on_cpu);
        before, a local packet's run could move to another CPU when preempted. (Stable kernels that took
        the fix count exactly too, without the slots.)"""
        return kernel_release() >= (6, 17)

    def check(self, btf: Btf) -> None:
        if (
            btf.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER") != BPF_PROG_TYPE_NETFILTER
            or btf.enum_value("bpf_attach_type", "BPF_NETFILTER") != BPF_NETFILTER
        ):
            raise KernelUnsupported("kernel has no netfilter BPF programs/links (Linux >= 6.4 needed)")

    def cflags(self, btf: Btf) -> list[str]:
        ctx_state, ctx_skb = 0, DEFAULT_CTX_SKB_OFFSET
        if btf.has_type(KIND_STRUCT, "bpf_nf_ctx"):
            ctx_state = field_offset(btf, "bpf_nf_ctx", "state", 8)
            ctx_skb = field_offset(btf, "bpf_nf_ctx", "skb", 8)
        return [
            f"-DKZT_OFF_CTX_STATE={ctx_state}",
            f"-DKZT_OFF_CTX_SKB={ctx_skb}",
            *origin_cflags(btf),
            *wire_cflags(btf),
            *read_cflags(btf, ctx_skb),
        ]

    def attach(self, programs: dict[str, int], directory: Path | None, *, adopt: bool) -> list[int]:
        fds = []
        for pf, name in LINK_NAMES.items():
            path = str(directory / name) if directory is not None else None
            fds.append(attach_or_adopt(programs["kzt_dispatch"], pf, path, adopt=adopt))
        return fds

    def owns_pin(self, name: str) -> bool:
        return name in self.link_names

    def release(self, fds: list[int], *, detach: bool) -> None:
        bpfsys.close_links(fds, detach=detach)


MODE = NetfilterMode()
