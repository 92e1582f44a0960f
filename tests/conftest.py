"""Suite-wide test policy.

Processes: the session is a child subreaper (tests/support/processes.py); at its end, any process it
started that still runs is killed and the run fails, naming it.

Kernel tests (`@pytest.mark.kernel`) need root, BTF, bcc and network namespaces. Off CI they skip with the
reason when those are missing; with `CI` set they fail instead, so a CI machine that cannot run them never
passes by skipping them.

Log capture: pytest's walk over every logger at the start of each phase takes logging's lock
(`_lock_logger_walk`), so a thread creating a logger then cannot fail the phase.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from _pytest.logging import catching_logs

from tests.support import processes

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


def _lock_logger_walk() -> None:
    """Hold logging's lock while pytest's log capture attaches itself (`catching_logs.__enter__`, at the
    start of every setup, call and teardown, and of collection and the session's end).

    That `__enter__` walks `logging.Logger.manager.loggerDict` without the lock. A thread that creates a
    logger meanwhile (`logging.getLogger` of a new name, as a module imported lazily makes its own: an
    in-process agent's first export imports `grpc._channel` and `grpc._simple_stubs` in its thread) adds
    to the dict under the walk, and the phase fails with `RuntimeError: dictionary changed size during
    iteration`, its one frame contextlib's `__enter__` (test_scaleout_restart, 1 run of 24 under load).
    `getLogger` adds under `logging._lock`, an RLock that `__enter__`'s own `addHandler` and `setLevel`
    take again: walking under it orders the two."""
    enter = catching_logs.__enter__
    if getattr(enter, "__wrapped__", None) is not None:
        return  # already wrapped (a second configure in the same process: pytester)

    @functools.wraps(enter)
    def locked(self: catching_logs[logging.Handler]) -> logging.Handler:
        with logging._lock:  # type: ignore[attr-defined]
            return enter(self)

    catching_logs.__enter__ = locked  # type: ignore[method-assign,assignment]


def pytest_configure(config: pytest.Config) -> None:
    processes.become_subreaper()
    _lock_logger_walk()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = processes.leftovers(os.getpid())
    if not left:
        return
    processes.kill_and_reap(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(left)} process(es) started by this session were still running (killed now):"]
    lines += [f"  pid={p.pid} ppid={p.ppid} {p.cmdline[:300]}" for p in left]
    if reporter is not None:
        reporter.ensure_newline()
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
