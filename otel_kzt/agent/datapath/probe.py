"""Feature probes and compile flags for the datapath, run before anything is loaded.

Each missing piece becomes one clear error from `otel_kzt.errors` (not root, bcc missing, no BTF, a mode
the kernel cannot run). The struct offsets the C reads come from the running kernel's BTF, as `-D` flags:
the shared ones here, the mode's own from its module.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from otel_kzt.agent.datapath import bpfsys
from otel_kzt.agent.datapath.btf import KIND_FUNC, Btf, kernel_btf
from otel_kzt.agent.datapath.kfunc import EXIT, MOV_K, insn
from otel_kzt.agent.datapath.mode import Mode, field_offset
from otel_kzt.errors import BccMissing, DatapathError, PrivilegeError

log = logging.getLogger(__name__)

# Package data: found next to this module however the package was installed (wheel or source tree).
BPF_DIR = Path(__file__).resolve().parent / "bpf"
_LOCAL_INCLUDE = re.compile(r'^#include "([a-z0-9_]+\.h)"\s*$')
FLOOR_SOURCE = BPF_DIR / "floor.c"
# "1": no write-combining slots where they could run (count.h then adds every packet to the map), for
# bench/datapath_udp.py to measure what the slots save; not a setting (the loader child inherits it).
NO_WRITE_COMBINE_ENV = "OTEL_KZT_NO_WRITE_COMBINE"
# A test seam, not a setting: comma-separated kernel enumerators (BPF_NETFILTER, BPF_PROG_TYPE_SCHED_CLS,
# BPF_CGROUP_INET_EGRESS ...) that the mode checks see as absent, so a kernel test can run the agent as on
# a kernel without a mode (tests/kernel/test_agent_mode_missing.py). Read here only; the loader child
# inherits it.
ABSENT_ENV = "OTEL_KZT_TEST_ABSENT"


@dataclass(frozen=True, slots=True)
class Features:
    mode_cflags: tuple[str, ...]  # the mode's own -D flags (its context offsets)
    skb_head: int  # offsets, in bytes
    skb_network_header: int
    skb_len: int
    skb_tail: int  # an offset from head (64-bit kernels): end of the linear data
    test_run: bool  # BPF_PROG_TEST_RUN for the mode's programs (netfilter: 6.6+): needed by eviction
    gso_bits: tuple[tuple[str, int], ...] = ()  # SKB_GSO_* values count.h's kzt_wire tests
    flush: bool = False  # the agent can run kzt_flush on every CPU (empties slots a previous build filled)
    write_combine: bool = False  # count.h's per-CPU slots (KZT_WC): flush, and runs stay on one CPU


# The SKB_GSO_* bits count.h reads (-DKZT_GSO_<name>), from the kernel's BTF: their values changed
# across kernels before, so none is assumed. One missing from this kernel can never be set: 0.
GSO_BITS = (
    "TCPV4",
    "TCPV6",
    "DODGY",
    "UDP_L4",
    "GRE",
    "GRE_CSUM",
    "IPXIP4",
    "IPXIP6",
    "UDP_TUNNEL",
    "UDP_TUNNEL_CSUM",
)


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


def probe(mode: Mode, btf: Btf | None = None) -> Features:
    """Check the kernel can run the datapath in `mode` and collect the offsets it needs."""
    btf = btf or kernel_btf()
    mode.check(as_checked(btf))
    features = Features(
        mode_cflags=tuple(mode.cflags(btf)),
        skb_head=field_offset(btf, "sk_buff", "head", 8),
        skb_network_header=field_offset(btf, "sk_buff", "network_header", 2),
        skb_len=field_offset(btf, "sk_buff", "len", 4),
        skb_tail=field_offset(btf, "sk_buff", "tail", 4),
        test_run=btf.has_type(KIND_FUNC, mode.test_run_function),
        gso_bits=tuple((name, btf.enumerator(f"SKB_GSO_{name}") or 0) for name in GSO_BITS),
        flush=can_flush_cpus(),
        write_combine=(
            can_flush_cpus() and mode.runs_on_one_cpu and os.environ.get(NO_WRITE_COMBINE_ENV) != "1"
        ),
    )
    log.debug("datapath features %s", features)
    return features


def as_checked(btf: Btf) -> Btf:
    """The BTF the mode checks read: the kernel's, less what the `ABSENT_ENV` test seam takes away."""
    absent = frozenset(name for name in os.environ.get(ABSENT_ENV, "").split(",") if name)
    if not absent:
        return btf
    log.debug("test seam %s: checks see %s as absent", ABSENT_ENV, ",".join(sorted(absent)))
    return btf.without(absent)


@functools.cache
def can_flush_cpus() -> bool:
    """Whether the agent can run a program on a CPU of its choice (count.h's kzt_flush): a raw tracepoint
    program (CAP_PERFMON) test-run with BPF_F_TEST_RUN_ON_CPU (Linux >= 5.10). Without it count.h adds
    every packet to the map itself, as it must when nothing could empty the slots. False without root
    (`--print-bpf`): that form is printed."""
    try:
        fd = bpfsys.prog_load(
            bpfsys.BPF_PROG_TYPE_RAW_TRACEPOINT, insn(MOV_K, imm=0) + insn(EXIT), 0, "kzt_probe_cpu"
        )
    except (DatapathError, PrivilegeError) as exc:
        log.debug("probe kzt_probe_cpu refused: %s", exc)
        return False
    try:
        bpfsys.test_run_on_cpu(fd, min(os.sched_getaffinity(0)))
    except DatapathError as exc:
        log.debug("test run on a CPU refused: %s", exc)
        return False
    finally:
        os.close(fd)
    return True


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
        *features.mode_cflags,
        f"-DKZT_OFF_SKB_HEAD={features.skb_head}",
        f"-DKZT_OFF_SKB_NH={features.skb_network_header}",
        f"-DKZT_OFF_SKB_LEN={features.skb_len}",
        f"-DKZT_OFF_SKB_TAIL={features.skb_tail}",
        *(f"-DKZT_GSO_{name}={value:#x}" for name, value in features.gso_bits),
        f"-DKZT_MAP_SIZE={map_size}",
        f"-DKZT_EPH_MIN={ephemeral_min}",
        f"-DKZT_EPH_MAX={ephemeral_max}",
        f"-DKZT_EVICT_BATCH={evict_batch}",
        f"-DKZT_DYING_SIZE={dying_size}",
    ]
    if features.write_combine:
        flags.append("-DKZT_WC")
    if pin_dir is not None:
        flags.append(f'-DKZT_PIN_DIR="{pin_dir}"')
    return flags


def entry_source(mode: Mode) -> Path:
    return BPF_DIR / mode.entry


def _inline(path: Path, seen: set[str]) -> str:
    lines = []
    for line in path.read_text().splitlines(keepends=True):
        match = _LOCAL_INCLUDE.match(line)
        if match is None:
            lines.append(line)
        elif (name := match.group(1)) not in seen:
            seen.add(name)
            lines.append(f"/* ---- {name} ---- */\n{_inline(BPF_DIR / name, seen)}/* ---- end {name} */\n")
    return "".join(lines)


def program_text(mode: Mode) -> str:
    """The mode's entry file with the package's own headers inlined: one translation unit, because bcc
    rewrites map calls (`flows4.lookup(...)`) only in the text it is given, never in included files."""
    return _inline(entry_source(mode), set())


def source_hash(mode: Mode, cflags: list[str]) -> int:
    """A non-zero 63-bit identity of the counter program: the C it is built from plus its flags."""
    digest = hashlib.sha256(program_text(mode).encode())
    digest.update("\0".join(cflags).encode())
    return (int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)) or 1


def final_source(mode: Mode, cflags: list[str]) -> str:
    """The C exactly as compiled, for `--print-bpf`: the flags, then the program text."""
    return f"/* compiled by bcc with: {' '.join(cflags)} */\n{program_text(mode)}"
