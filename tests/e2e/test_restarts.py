"""DESIGN §5.4 across the whole system: an agent killed and restarted, and the enricher killed and
restarted, while traffic flows; the final totals still equal the ground truth, byte for byte."""

from __future__ import annotations

import threading
import time

import pytest

from otel_kzt.demo.runner import ClusterRun
from tests.e2e.conftest import run_exchanges, wait_exact

pytestmark = pytest.mark.kernel

RESTARTED_EXACT_TIMEOUT_S = 60.0  # a restarted agent compiles its program again before it reports


def _round(run: ClusterRun) -> list[tuple[str, str, int, int]]:
    cluster = run.cluster
    pods = cluster.routed_pods()
    jobs = []
    for i, pod in enumerate(pods):
        peer = pods[(i + 1) % len(pods)]
        jobs += [(pod.netns, peer.v4, 400, 9_000 + i), (pod.netns, peer.v6, 400, 7_000 + i)]
        jobs.append((pod.netns, cluster.plan.internet(4 if i % 2 else 6), 2_500, 300))
    return jobs


def test_restarts_mid_traffic_lose_nothing(e2e: ClusterRun) -> None:
    stop = threading.Event()
    rounds = []
    failures: list[BaseException] = []

    def traffic() -> None:
        try:
            while not stop.is_set():
                run_exchanges(_round(e2e), workers=4)
                rounds.append(time.monotonic())
                time.sleep(0.05)
        except BaseException as exc:  # re-raised in the test's thread below
            failures.append(exc)

    sender = threading.Thread(target=traffic, name="e2e-traffic")
    sender.start()
    try:
        time.sleep(1.0)
        victim = e2e.cluster.nodes[0]
        e2e.stop_agent(victim, kill=True)  # SIGKILL: no final export; the pinned datapath keeps counting
        during_gap = len(rounds)
        time.sleep(2.0)
        assert len(rounds) > during_gap  # traffic did flow while the agent was away
        e2e.start_agent(victim)
        time.sleep(1.0)
        e2e.stop_enricher(kill=True)  # agents keep their cumulative sums and retry
        time.sleep(2.0)
        e2e.start_enricher()
        time.sleep(1.0)
    finally:
        stop.set()
        sender.join(30)
    assert not failures, failures
    assert len(rounds) >= 5
    e2e.wait_agents_reported(RESTARTED_EXACT_TIMEOUT_S)
    wait_exact(e2e, RESTARTED_EXACT_TIMEOUT_S)
