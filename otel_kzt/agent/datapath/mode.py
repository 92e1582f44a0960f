"""What a datapath mode gives the shared core: its C entry file, program type and how it attaches.

The core (BTF offsets, the loader child, the maps, pins, eviction, snapshots) is the same for every mode;
a mode only decides where the counter sees packets. Modes: `netfilter` (netfilter.py); `tc` and `cgroup`
sit next to it and register in `modes.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from otel_kzt.agent.datapath.btf import Btf
from otel_kzt.errors import KernelUnsupported


class Mode(Protocol):
    name: str  # the --datapath value
    entry: str  # its C file under bpf/: defines kzt_dispatch and kzt_count over bpf/count.h
    prog_type: int  # of kzt_dispatch and kzt_count
    attach_type: int
    test_run_function: str  # the kernel function that test-runs its programs (the evictor needs it)

    @property
    def runs_on_one_cpu(self) -> bool:
        """Whether a run of its programs always finishes on the CPU it started on (it may be interrupted
        or preempted there): count.h's per-CPU write-combining slots need it."""

    @property
    def link_names(self) -> tuple[str, ...]:
        """Its attachments' pins in the node directory (tc: one per hooked device)."""

    def check(self, btf: Btf) -> None:
        """Raise KernelUnsupported (one line naming what is missing) when this kernel cannot run it."""

    def cflags(self, btf: Btf) -> list[str]:
        """The mode's own -D flags (context offsets) from the running kernel's BTF."""

    def attach(self, programs: dict[str, int], directory: Path | None, *, adopt: bool) -> list[int]:
        """Attach (or adopt the pinned links under `directory`); returns link fds the caller owns."""

    def owns_pin(self, name: str) -> bool:
        """Whether a pin of the node directory is one of this mode's attachments (a mode switch removes
        the other modes' ones)."""

    def release(self, fds: list[int], *, detach: bool) -> None:
        """Close the link fds `attach` returned; with `detach`, take the attachments off the kernel."""


def field_offset(btf: Btf, struct_name: str, field: str, size: int) -> int:
    """A struct member's byte offset from BTF, checked against the size the C reads."""
    offset, actual = btf.field(struct_name, field)
    if actual != size:
        raise KernelUnsupported(f"kernel BTF: {struct_name}.{field} is {actual} bytes, expected {size}")
    return offset
