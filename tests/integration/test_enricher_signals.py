"""The enricher's shutdown cannot deadlock: 50 processes each get SIGTERM, SIGTERM and SIGINT within a
millisecond, at varied moments after start (some while a request is being enriched), and every one exits 0
within its shutdown timeout. (Before `otel_kzt.signals`, 3 of 6 such enrichers hung forever.)"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_enricher_badinput import good_request, post
from tests.integration.test_enricher_command import start
from tests.integration.test_enricher_service import Downstream, downstream, metadata_file
from tests.support.processes import signal_burst

__all__ = ["downstream", "metadata_file"]
pytestmark = pytest.mark.integration

RUNS, PARALLEL = 50, 4
SHUTDOWN_TIMEOUT_S = 5.0


def _one(run: int, metadata: Path, downstream: Downstream) -> tuple[int, int | None, float, int]:
    """(run, exit code or None when it hung, seconds from the burst to the exit, burst ns)."""
    proc, ports = start(
        metadata,
        "--export-endpoint",
        f"127.0.0.1:{downstream.port}",
        "--shutdown-timeout",
        f"{SHUTDOWN_TIMEOUT_S}s",
    )
    try:
        rng = random.Random(run)
        if run % 2:  # a request in flight or just enriched: its export is queued when the signals come
            threading.Thread(target=post, args=(ports["http"], good_request().SerializeToString())).start()
        time.sleep(rng.uniform(0.0, 0.05))
        burst_ns = signal_burst(proc.pid)
        sent = time.monotonic()
        try:
            proc.communicate(timeout=SHUTDOWN_TIMEOUT_S + 30)  # far beyond: a hang, not a slow exit
        except subprocess.TimeoutExpired:
            return run, None, time.monotonic() - sent, burst_ns
        return run, proc.returncode, time.monotonic() - sent, burst_ns
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_fifty_enrichers_survive_a_signal_burst(metadata_file: Path, downstream: Downstream) -> None:
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda run: _one(run, metadata_file, downstream), range(RUNS)))
    hung = [run for run, code, _, _ in results if code is None]
    failed = [(run, code) for run, code, _, _ in results if code not in (None, 0)]
    slow = [
        (run, round(took, 2)) for run, code, took, _ in results if code == 0 and took > SHUTDOWN_TIMEOUT_S
    ]
    assert (hung, failed, slow) == ([], [], [])
    assert sorted(burst for *_, burst in results)[RUNS // 2] < 1_000_000  # the median burst: < 1 ms
