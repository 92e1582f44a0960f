"""Suite-wide test policy.

Kernel tests (`@pytest.mark.kernel`) need root, BTF, bcc and network namespaces. Off CI they skip with the
reason when those are missing; with `CI` set they fail instead, so a CI machine that cannot run them never
passes by skipping them.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@functools.cache
def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root (CAP_BPF, CAP_NET_ADMIN)"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "iproute2 and nftables are needed (run scripts/setup.sh)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "Debian's bcc (python3-bpfcc) is not importable (run scripts/setup.sh)"
    return None


def require(available: bool, reason: str) -> None:
    """Skip a test whose outside tool is missing, except in CI, where set-up installs every tool: there
    a missing one is a broken set-up and fails, never a silent skip."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and a required tool is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and eBPF is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
