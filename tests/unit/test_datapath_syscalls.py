"""The bpf(2) and membarrier(2) numbers the datapath calls by (bpfsys.SYSCALLS) are the kernel's own, read
from its UAPI headers (linux-libc-dev, or the kernel headers scripts/setup.sh installs): x86_64's table and
the generic one arm64 uses. Any other machine is refused with a line naming it, never a wrong syscall."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from otel_kzt.agent.datapath import bpfsys
from otel_kzt.errors import KernelUnsupported
from tests.conftest import require

HEADERS = {
    "x86_64": [
        "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
        "/usr/src/linux-headers-*/arch/x86/include/generated/uapi/asm/unistd_64.h",
    ],
    "aarch64": [
        "/usr/include/asm-generic/unistd.h",
        "/usr/src/linux-headers-*/include/uapi/asm-generic/unistd.h",
    ],
}


def _header(machine: str) -> Path | None:
    for pattern in HEADERS[machine]:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[-1]
    return None


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_syscall_numbers_are_the_kernels(machine: str) -> None:
    header = _header(machine)
    require(header is not None, f"no UAPI syscall table for {machine} (linux-libc-dev or linux-headers)")
    assert header is not None
    text = header.read_text()
    numbers = {
        name: int(re.search(rf"#define __NR_{name}\s+(\d+)\b", text).group(1))  # type: ignore[union-attr]
        for name in ("bpf", "membarrier")
    }
    assert bpfsys.SYSCALLS[machine] == (numbers["bpf"], numbers["membarrier"]), header
    assert bpfsys.SYSCALLS["arm64"] == bpfsys.SYSCALLS["aarch64"]  # uname's two spellings


def test_another_machine_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.uname", functools.partial(SimpleNamespace, machine="riscv64"))
    for call in (bpfsys.sys_bpf, bpfsys.sys_membarrier):
        with pytest.raises(KernelUnsupported, match="x86_64 and arm64 only, not 'riscv64'"):
            call()
