"""`otel-kzt demo` as a user runs it: --once prints a report, Ctrl-C / SIGTERM (also a burst of them) and
the end of --duration leave no namespace, link, pin or process behind, and a second demo gets a clear
error."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from otel_kzt.agent.datapath.pins import node_dir
from otel_kzt.demo.cluster import make_cluster
from otel_kzt.demo.runner import LOCK_DIR, ClusterRun, RunLock
from otel_kzt.netns import NETNS_DIR, netns_exists
from tests.conftest import REPO
from tests.e2e.conftest import GRPC_PORT, Slot
from tests.support.processes import CLI, STOP_BURST, signal_burst

pytestmark = pytest.mark.kernel

ZONES, PER_ZONE = 2, 1


@pytest.fixture
def demo(slot: Slot) -> list[str]:
    """The demo command line of this session's slot (its own prefix, addresses and ports)."""
    prefix, net_id, metrics_port = slot.demo
    return [*CLI, "demo", "--prefix", prefix, "--net-id", str(net_id),
            "--zones", str(ZONES), "--nodes-per-zone", str(PER_ZONE), "--metrics-port", str(metrics_port),
            "--otlp-port", str(GRPC_PORT), "--interval", "1s"]


def assert_nothing_left(slot: Slot) -> None:
    prefix, net_id, _port = slot.demo
    cluster = make_cluster(prefix, net_id, ZONES, PER_ZONE)
    assert not [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{prefix}-")]
    assert not Path(f"/sys/class/net/{cluster.host_link}").exists()
    assert not [n.name for n in cluster.nodes if node_dir(n.name).exists()]
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            if any(n.name in cmdline for n in cluster.nodes) or f"--prefix\0{prefix}\0" in cmdline:
                leftovers.append(cmdline.replace("\0", " "))
    assert not leftovers
    lock = RunLock(LOCK_DIR / f"otel-kzt-{prefix}.lock")
    lock.acquire()  # free: nobody holds it
    lock.release()


def test_once_prints_a_report_and_leaves_nothing(slot: Slot, demo: list[str]) -> None:
    proc = subprocess.run([*demo, "--once", "--duration", "6s"], capture_output=True, text=True,
                          timeout=180, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "final report" in out and "Top cross-zone talkers" in out
    assert "no cross-zone traffic reported yet" not in out  # two zones: the story crosses them
    assert "shop/" in out and "cross-zone" in out and f"http://127.0.0.1:{slot.demo[2]}/metrics" in out
    assert_nothing_left(slot)


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@contextlib.contextmanager
def _live_demo(demo: list[str], errors: Path) -> Iterator[subprocess.Popen[str]]:
    """A live demo whose view has printed its first table; killed on the way out if still running."""
    lines: queue.Queue[str] = queue.Queue()
    with errors.open("w") as err, subprocess.Popen([*demo, "--duration", "5m"], stdout=subprocess.PIPE,
                                                    stderr=err, text=True, cwd=REPO) as proc:
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        try:
            try:
                while "Top cross-zone talkers" not in lines.get(timeout=120):
                    pass
            except queue.Empty:
                pytest.fail(f"no view within 120s (exit {proc.poll()}): {errors.read_text()[-3000:]}")
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("sigs", [(signal.SIGINT,), (signal.SIGTERM,), STOP_BURST],
                         ids=["SIGINT", "SIGTERM", "burst"])
def test_interrupted_live_view_leaves_nothing(sigs: tuple[int, ...], tmp_path: Path, slot: Slot,
                                              demo: list[str]) -> None:
    """Ctrl-C, SIGTERM, and SIGTERM SIGTERM SIGINT within a millisecond (issue 12: the demo's shutdown
    cannot deadlock either): a clean exit that leaves nothing behind."""
    with _live_demo(demo, tmp_path / "demo.err") as proc:
        signal_burst(proc.pid, sigs)
        assert proc.wait(60) == 0
    assert_nothing_left(slot)


def _enricher_pid(metrics_port: int) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"enricher" in cmdline and f"127.0.0.1:{metrics_port}".encode() in cmdline:
                return int(proc.name)
    raise AssertionError("the demo's enricher is not running")


def test_enricher_dying_ends_the_demo_cleanly(tmp_path: Path, slot: Slot, demo: list[str]) -> None:
    errors = tmp_path / "demo.err"
    with _live_demo(demo, errors) as proc:
        os.kill(_enricher_pid(slot.demo[2]), signal.SIGKILL)
        assert proc.wait(60) == 1
    assert "the enricher stopped" in errors.read_text()
    assert_nothing_left(slot)


def test_killed_demo_is_cleaned_up_by_the_next(tmp_path: Path, slot: Slot, demo: list[str]) -> None:
    """SIGKILL: no clean-up can run; its children die with it and the next demo removes the rest."""
    with _live_demo(demo, tmp_path / "demo.err") as proc:
        proc.kill()
        proc.wait()
    assert netns_exists(f"{slot.demo[0]}-n0")  # left behind, as a crash would
    proc2 = subprocess.run([*demo, "--once", "--duration", "2s"], capture_output=True, text=True,
                           timeout=180, cwd=REPO, check=False)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert_nothing_left(slot)


def test_second_demo_gets_a_clear_error(e2e: ClusterRun) -> None:
    """While the session's run holds its lock, a demo of the same prefix refuses and touches nothing."""
    cfg = e2e.config
    proc = subprocess.run([*CLI, "demo", "--prefix", cfg.prefix,
                           "--net-id", str(cfg.net_id), "--once"], capture_output=True, text=True,
                          timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 1
    assert "another otel-kzt demo is running" in proc.stderr
    assert all(netns_exists(n.netns) for n in e2e.cluster.nodes)
    assert e2e.scrape()  # the running one is untouched


def test_apply_recommendations_mid_run_shows_before_and_after(slot: Slot, demo: list[str]) -> None:
    """The story's web -> api Service crosses zones until --apply-recommendations sets the setting the
    report recommends; the final report names the change and the windows before and after it."""
    proc = subprocess.run([*demo, "--once", "--duration", "36s", "--apply-recommendations", "--apply-after",
                           "18s", "--savings-window", "15s"], capture_output=True, text=True, timeout=240,
                          cwd=REPO, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "applied recommendations: shop/api: PreferSameZone" in proc.stderr
    out = proc.stdout
    row = next(line for line in out.splitlines() if "shop/api" in line and "PreferSameZone" in line)
    assert ": none" in row and "less" in out  # the change and what it cut, in the Services table
    assert "headless Service" in out  # postgres: no routing advice, and the report says why
    assert_nothing_left(slot)
