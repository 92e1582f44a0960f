"""The `netfilter` mode: the counter at netfilter POSTROUTING ahead of source NAT (Linux >= 6.4).

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
import logging
import os
from pathlib import Path

from otel_kzt.agent.datapath import bpfsys
from otel_kzt.agent.datapath.bpfsys import ENOTSUPP, BpfCallError
from otel_kzt.agent.datapath.btf import KIND_STRUCT, Btf
from otel_kzt.agent.datapath.mode import field_offset
from otel_kzt.errors import KernelUnsupported

log = logging.getLogger(__name__)

BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
NF_INET_POST_ROUTING = 4
NF_IP_PRI_NAT_SRC = 100
LINK_PRIORITY = NF_IP_PRI_NAT_SRC - 1  # ahead of source NAT: pods keep their own address
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
    if old_fd >= 0 and adopt:
        log.info("link adopted pin=%s", path)
        return old_fd
    priority = LINK_PRIORITY
    if old_fd >= 0 and bpfsys.link_info(old_fd).priority == LINK_PRIORITY:
        priority = LINK_PRIORITY - 1  # the kernel refuses two links at one (pf, hook, priority)
    fd = link_create_netfilter(dispatch_fd, pf, priority)
    if old_fd >= 0 and path is not None:
        bpfsys.link_detach(old_fd)
        os.close(old_fd)
        os.unlink(path)
    if path is not None:
        bpfsys.obj_pin(fd, path)
    log.info("link attached pf=%d priority=%d pin=%s", pf, priority, path)
    return fd


class NetfilterMode:
    """What the shared core needs from this mode (`mode.Mode`)."""

    name = "netfilter"
    entry = "netfilter.c"
    prog_type = BPF_PROG_TYPE_NETFILTER
    attach_type = BPF_NETFILTER
    link_names = tuple(LINK_NAMES.values())
    test_run_function = "bpf_prog_test_run_nf"  # Linux >= 6.6

    def check(self, btf: Btf) -> None:
        if (
            btf.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER") != BPF_PROG_TYPE_NETFILTER
            or btf.enum_value("bpf_attach_type", "BPF_NETFILTER") != BPF_NETFILTER
        ):
            raise KernelUnsupported("kernel has no netfilter BPF programs/links (Linux >= 6.4 needed)")

    def cflags(self, btf: Btf) -> list[str]:
        ctx_skb = DEFAULT_CTX_SKB_OFFSET
        if btf.has_type(KIND_STRUCT, "bpf_nf_ctx"):
            ctx_skb = field_offset(btf, "bpf_nf_ctx", "skb", 8)
        return [f"-DKZT_OFF_CTX_SKB={ctx_skb}"]

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
