"""Attaching a program at a device's egress: tcx links (Linux >= 6.6), else a classic clsact filter.

tcx (`BPF_LINK_CREATE`, attach type `BPF_TCX_EGRESS`) is a real link: it can be pinned, adopted by the
next agent and detached, and `BPF_F_BEFORE` without a relative program puts ours first, ahead of a CNI's
programs, whatever it returns (we always return `TCX_NEXT`). Older kernels have no tcx: the program is
then a cls_bpf filter on the device's clsact qdisc (added by `tc`, iproute2, which the agent image
carries), at the first free preference so it runs before filters added later with higher numbers. A
classic filter is no link: the pin of such a device holds the program itself, and the filter (found by
its fixed handle) is what is removed on detach.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from dataclasses import dataclass

from otel_kzt.agent.datapath import bpfsys
from otel_kzt.agent.datapath.bpfsys import ENOTSUPP, BpfCallError
from otel_kzt.errors import DatapathError, KernelUnsupported

log = logging.getLogger(__name__)

BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3
BPF_LINK_TYPE_TCX = 11
BPF_OBJ_TYPE_PROG = 1  # what bpffs holds: a program (classic filter) or a link (tcx)
CLASSIC_HANDLE = 0x6B7A  # "kz": how our classic filter is found again
CLASSIC_MAX_PREF = 49151  # tc picks 49152 and up itself for filters added without a preference


@dataclass(frozen=True, slots=True)
class TcxLink:
    link_id: int
    prog_id: int
    ifindex: int
    attach_type: int


def tcx_attach(prog_fd: int, ifindex: int, device: str) -> int:
    """A tcx egress link running `prog_fd` first on `ifindex`; KernelUnsupported before Linux 6.6."""
    # link_create: prog_fd, target_ifindex, attach_type, flags, then tcx {relative_fd, expected_revision}
    attr = bpfsys.pack_attr("<IIIIIIQ", prog_fd, ifindex, BPF_TCX_EGRESS, BPF_F_BEFORE, 0, 0, 0)
    try:
        return bpfsys.bpf(bpfsys.BPF_LINK_CREATE, attr, f"attach tcx egress program to {device}")
    except BpfCallError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
            raise KernelUnsupported(f"no tcx links (Linux >= 6.6) for {device}: {exc}") from exc
        raise


def tcx_info(fd: int) -> TcxLink | None:
    """What a pinned object is, when it is a tcx link; None when it is anything else (a program)."""
    if not _is_link(fd):
        return None
    info = bpfsys.link_info(fd)  # its union at offset 16 is tcx {ifindex, attach_type} for a tcx link
    if info.link_type != BPF_LINK_TYPE_TCX:
        return None
    return TcxLink(info.link_id, info.prog_id, info.pf, info.hooknum)


def _is_link(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
        return any(line.startswith("link_type:") for line in info)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=15, check=False)
    except OSError as exc:
        raise DatapathError(f"cannot run tc (iproute2) for a classic clsact filter: {exc}") from exc
    if check and proc.returncode != 0:
        raise DatapathError(f"tc {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _egress_filters(device: str) -> list[dict[str, object]]:
    out = _tc("-j", "filter", "show", "dev", device, "egress", check=False).stdout
    try:
        filters = json.loads(out or "[]")
    except ValueError:
        return []
    return filters if isinstance(filters, list) else []


def classic_find(device: str) -> int | None:
    """The preference of our classic filter on `device`, or None."""
    for entry in _egress_filters(device):
        options = entry.get("options")
        handle = options.get("handle") if isinstance(options, dict) else None
        if isinstance(handle, str) and int(handle, 16) == CLASSIC_HANDLE:
            pref = entry.get("pref")
            return int(pref) if isinstance(pref, int) else None
    return None


def classic_attach(pinned_prog: str, device: str) -> int:
    """A cls_bpf filter running the pinned program on `device`'s egress; returns its preference.

    An existing filter of ours is replaced in place (same preference, same handle): the new program
    takes over at once, with no moment where neither runs."""
    _tc("qdisc", "add", "dev", device, "clsact", check=False)  # present already: fine
    pref = classic_find(device)
    if pref is None:
        taken = {int(str(e.get("pref"))) for e in _egress_filters(device) if str(e.get("pref", "")).isdigit()}
        pref = next(p for p in range(1, CLASSIC_MAX_PREF) if p not in taken)
    _tc(
        "filter", "replace", "dev", device, "egress", "pref", str(pref), "handle", hex(CLASSIC_HANDLE),
        "bpf", "direct-action", "pinned", pinned_prog,
    )  # fmt: skip
    log.info("classic tc filter attached device=%s pref=%d", device, pref)
    return pref


def classic_detach(device: str) -> bool:
    """Remove our classic filter from `device`; False when there is none (or the device is gone)."""
    pref = classic_find(device)
    if pref is None:
        return False
    _tc("filter", "del", "dev", device, "egress", "pref", str(pref), "handle", hex(CLASSIC_HANDLE), "bpf")
    return True


def detach_pinned(path: str, device: str) -> bool:
    """Detach whatever the pin `path` stands for (tcx link, or classic filter); True when done."""
    try:
        fd = bpfsys.obj_get(path)
    except FileNotFoundError:
        return False
    try:
        if tcx_info(fd) is not None:
            bpfsys.link_detach(fd)
            return True
    finally:
        os.close(fd)
    return classic_detach(device)
