"""The `cgroup` mode: the counter at socket egress of a cgroup v2 subtree (Linux >= 5.7).

Every socket below `--cgroup-root` (the host's cgroup2 mount by default: `/sys/fs/cgroup`, or
`/sys/fs/cgroup/unified` on hybrid hosts) passes the program once per packet it sends, in the sender's own
network namespace, before the node's NAT or a CNI's eBPF routing touch it: exact under masquerade and
whatever the CNI does afterwards. What has no full socket never passes (forwarded hops such as the
NodePort hop, kernel RSTs, SYN-cookie answers, request-socket SYN-ACKs before 6.6); loopback is skipped
in the program. One link, pinned as `cgroup_egress`, adopted by the next agent when it is attached to the
same cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from otel_kzt.agent.datapath import bpfsys
from otel_kzt.agent.datapath.bpfsys import ENOTSUPP, BpfCallError
from otel_kzt.agent.datapath.btf import Btf
from otel_kzt.errors import ConfigError, KernelUnsupported

log = logging.getLogger(__name__)

BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_CGROUP_INET_EGRESS = 1
BPF_LINK_TYPE_CGROUP = 3
CGROUP2_MAGIC = "cgroup2"
LINK_NAME = "cgroup_egress"
CANDIDATE_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def cgroup2_mounts(mounts_file: str = "/proc/self/mounts") -> list[str]:
    with open(mounts_file, encoding="ascii", errors="replace") as mounts:
        return [f[1] for f in (line.split() for line in mounts) if len(f) > 2 and f[2] == CGROUP2_MAGIC]


def default_root(mounts_file: str = "/proc/self/mounts") -> str | None:
    """The host's cgroup2 mount: unified (`/sys/fs/cgroup`) or hybrid (`/sys/fs/cgroup/unified`)."""
    mounted = cgroup2_mounts(mounts_file)
    return next((root for root in CANDIDATE_ROOTS if root in mounted), mounted[0] if mounted else None)


def check_root(root: str, mounts_file: str = "/proc/self/mounts") -> None:
    """A cgroup-root must be a directory of a cgroup2 file system (a mount point or below one)."""
    path = Path(root)
    if not path.is_dir():
        raise ConfigError("cgroup_root", f"{root}: no such directory")
    mounted = cgroup2_mounts(mounts_file)
    if not any(path == Path(m) or Path(m) in path.parents for m in mounted):
        where = ", ".join(mounted) or "nowhere"
        raise ConfigError("cgroup_root", f"{root} is not on a cgroup v2 file system (cgroup2 is at {where})")


def link_create_cgroup(prog_fd: int, root: str) -> int:
    """A link running `prog_fd` at socket egress of every socket below `root`; returns its fd."""
    cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # link_create: prog_fd, target_fd (the cgroup), attach_type, flags
        attr = bpfsys.pack_attr("<IIII", prog_fd, cgroup_fd, BPF_CGROUP_INET_EGRESS, 0)
        try:
            return bpfsys.bpf(bpfsys.BPF_LINK_CREATE, attr, f"attach cgroup egress program to {root}")
        except BpfCallError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                raise KernelUnsupported(
                    f"kernel refused a cgroup BPF link on {root} (Linux >= 5.7): {exc}"
                ) from exc
            raise
    finally:
        os.close(cgroup_fd)


def linked_cgroup(fd: int) -> int | None:
    """The cgroup id a pinned cgroup link is attached to; None for anything else."""
    info = bpfsys.link_info(fd)
    if info.link_type != BPF_LINK_TYPE_CGROUP:
        return None
    return info.pf | (info.hooknum << 32)  # link_info's union at offset 16: cgroup {u64 cgroup_id, ...}


class CgroupMode:
    """`mode.Mode` for cgroup socket egress, configured with its root."""

    name = "cgroup"
    entry = "cgroup.c"
    prog_type = BPF_PROG_TYPE_CGROUP_SKB
    attach_type = BPF_CGROUP_INET_EGRESS
    link_names: tuple[str, ...] = (LINK_NAME,)
    test_run_function = "bpf_prog_test_run_skb"
    runs_on_one_cpu = True  # cgroup programs run with migration disabled

    def __init__(self, root: str | None = None) -> None:
        self.root = root

    def owns_pin(self, name: str) -> bool:
        return name == LINK_NAME

    def _root(self) -> str:
        root = self.root or default_root()
        if root is None:
            raise KernelUnsupported("cgroup datapath: no cgroup v2 file system mounted (--cgroup-root)")
        return root

    def check(self, btf: Btf) -> None:
        if btf.enum_value("bpf_attach_type", "BPF_CGROUP_INET_EGRESS") != BPF_CGROUP_INET_EGRESS:
            raise KernelUnsupported("kernel has no cgroup socket egress programs (BPF_CGROUP_INET_EGRESS)")
        if btf.enum_value("bpf_link_type", "BPF_LINK_TYPE_CGROUP") != BPF_LINK_TYPE_CGROUP:
            raise KernelUnsupported("kernel has no cgroup BPF links (Linux >= 5.7)")
        check_root(self._root())

    def cflags(self, btf: Btf) -> list[str]:
        return []

    def attach(self, programs: dict[str, int], directory: Path | None, *, adopt: bool) -> list[int]:
        root = self._root()
        path = str(directory / LINK_NAME) if directory is not None else None
        old_fd = -1
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                old_fd = bpfsys.obj_get(path)
        if old_fd >= 0 and adopt and linked_cgroup(old_fd) == os.stat(root).st_ino:
            log.info("cgroup link adopted root=%s pin=%s", root, path)
            return [old_fd]
        fd = link_create_cgroup(programs["kzt_dispatch"], root)
        bpfsys.replace_pin(path, old_fd, fd, bpfsys.link_detach)
        log.info("cgroup datapath attached root=%s pin=%s", root, path)
        return [fd]

    def release(self, fds: list[int], *, detach: bool) -> None:
        bpfsys.close_links(fds, detach=detach)
