"""Feature probes and compile flags for the datapath, run before anything is loaded.

Each missing piece becomes one clear error from `otel_kzt.errors` (not root, bcc missing, no BTF, no
netfilter BPF links). The struct offsets the C program reads come from here, as `-D` flags.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from otel_kzt.agent import netfilter
from otel_kzt.agent.btf import KIND_FUNC, KIND_STRUCT, Btf, kernel_btf
from otel_kzt.errors import BccMissing, KernelUnsupported, PrivilegeError

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
FLOW_SOURCE = BPF_DIR / "flow.c"
FLOW_HEADER = BPF_DIR / "flow.h"
FLOOR_SOURCE = BPF_DIR / "floor.c"
# struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff *skb; } when BTF lacks it.
DEFAULT_CTX_SKB_OFFSET = 8


@dataclass(frozen=True, slots=True)
class Features:
    ctx_skb: int  # offsets, in bytes
    skb_head: int
    skb_network_header: int
    skb_len: int
    skb_tail: int  # an offset from head (64-bit kernels): end of the linear data
    test_run: bool  # BPF_PROG_TEST_RUN for netfilter programs (6.6+): needed by eviction


def require_root() -> None:
    if os.geteuid() != 0:
        raise PrivilegeError("the datapath needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for bpffs)")


def require_bcc() -> None:
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise BccMissing(
            "bcc is not importable: install Debian's python3-bpfcc and run scripts/setup.sh "
            "(PyPI's `bcc` is an unrelated project)"
        ) from exc


def _field(btf: Btf, struct_name: str, field: str, size: int) -> int:
    offset, actual = btf.field(struct_name, field)
    if actual != size:
        raise KernelUnsupported(f"kernel BTF: {struct_name}.{field} is {actual} bytes, expected {size}")
    return offset


def probe(btf: Btf | None = None) -> Features:
    """Check the kernel can run the datapath and collect the offsets it needs."""
    btf = btf or kernel_btf()
    if (
        btf.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER") != netfilter.BPF_PROG_TYPE_NETFILTER
        or btf.enum_value("bpf_attach_type", "BPF_NETFILTER") != netfilter.BPF_NETFILTER
    ):
        raise KernelUnsupported("kernel has no netfilter BPF programs/links (Linux >= 6.4 needed)")
    ctx_skb = DEFAULT_CTX_SKB_OFFSET
    if btf.has_type(KIND_STRUCT, "bpf_nf_ctx"):
        ctx_skb = _field(btf, "bpf_nf_ctx", "skb", 8)
    features = Features(
        ctx_skb=ctx_skb,
        skb_head=_field(btf, "sk_buff", "head", 8),
        skb_network_header=_field(btf, "sk_buff", "network_header", 2),
        skb_len=_field(btf, "sk_buff", "len", 4),
        skb_tail=_field(btf, "sk_buff", "tail", 4),
        test_run=btf.has_type(KIND_FUNC, "bpf_prog_test_run_nf"),
    )
    log.debug("datapath features %s", features)
    return features


def flow_cflags(
    features: Features,
    *,
    map_size: int,
    ephemeral_min: int,
    ephemeral_max: int,
    evict_batch: int,
    dying_size: int,
    pin_dir: str | None,
) -> list[str]:
    flags = [
        f"-I{BPF_DIR}",
        f"-DKZT_OFF_CTX_SKB={features.ctx_skb}",
        f"-DKZT_OFF_SKB_HEAD={features.skb_head}",
        f"-DKZT_OFF_SKB_NH={features.skb_network_header}",
        f"-DKZT_OFF_SKB_LEN={features.skb_len}",
        f"-DKZT_OFF_SKB_TAIL={features.skb_tail}",
        f"-DKZT_MAP_SIZE={map_size}",
        f"-DKZT_EPH_MIN={ephemeral_min}",
        f"-DKZT_EPH_MAX={ephemeral_max}",
        f"-DKZT_EVICT_BATCH={evict_batch}",
        f"-DKZT_DYING_SIZE={dying_size}",
    ]
    if pin_dir is not None:
        flags.append(f'-DKZT_PIN_DIR="{pin_dir}"')
    return flags


def source_hash(cflags: list[str]) -> int:
    """A non-zero 63-bit identity of the counter program: the C it is built from plus its flags."""
    digest = hashlib.sha256()
    for path in (FLOW_HEADER, FLOW_SOURCE):
        digest.update(path.read_bytes())
    digest.update("\0".join(cflags).encode())
    return (int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)) or 1


def final_source(cflags: list[str]) -> str:
    """The C exactly as compiled, for `--print-bpf`: the flags, the header, the program."""
    return (
        f"/* compiled by bcc with: {' '.join(cflags)} */\n"
        f"/* ---- {FLOW_HEADER.name} ---- */\n{FLOW_HEADER.read_text()}\n"
        f"/* ---- {FLOW_SOURCE.name} ---- */\n{FLOW_SOURCE.read_text()}"
    )
