"""The agent's shutdown cannot deadlock: 50 agents (real datapath, --no-pin) each get SIGTERM, SIGTERM and
SIGINT within a millisecond while they wait for their first interval; every one exits 0 within its
shutdown timeout (the final export's deadline, --otlp-timeout) and its final export reached the receiver.

The interval is an hour, so the only export of each agent is the one on shutdown: a request from its node
is the proof that it was delivered. Each run has its own node name; a few run at once, one per node
namespace (a netns takes one agent's links at a time: they share the hook priority). Every other run logs
with `--log-format json`: each line of its stderr is one JSON object (the loader child's lines too).

    root netns: OTLP receiver on 0.0.0.0:<port>  ── ks<run>r<i> ═══ ks<run>u<i> ──  ks<run>-n<i> (agents)
                10.91.<run>.<4i+1>/30                                10.91.<run>.<4i+2>/30
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from otel_kzt import netns, schema
from tests.support.processes import CLI, signal_burst
from tests.unit.test_agent_support import GrpcReceiver

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
RUNS, PARALLEL = 50, 3
NODE_NS = [f"ks{RUN}-n{i}" for i in range(PARALLEL)]
OTLP_TIMEOUT_S = 5.0  # the agent's shutdown deadline: its final export gives up then


@pytest.fixture(scope="module")
def receiver() -> Iterator[GrpcReceiver]:
    rx = GrpcReceiver("0.0.0.0:0")
    with netns.Topology() as topo:
        for i, ns in enumerate(NODE_NS):
            topo.netns(ns)
            topo.veth(
                None,
                f"ks{RUN}r{i}",
                ns,
                f"ks{RUN}u{i}",
                a_addrs=[f"10.91.{RUN}.{4 * i + 1}/30"],
                b_addrs=[f"10.91.{RUN}.{4 * i + 2}/30"],
            )
        rx.start()
        topo.on_close("otlp receiver", rx.stop)
        yield rx


def _nodes_delivered(rx: GrpcReceiver) -> set[str]:
    return {
        kv.value.string_value
        for request in rx.snapshot()
        for kv in request.resource_metrics[0].resource.attributes
        if kv.key == schema.RESOURCE_NODE_NAME
    }


def _one(run: int, rx: GrpcReceiver, logs: Path) -> tuple[str, int | None, float]:
    """(node, exit code or None when it hung, seconds from the burst to the exit); runs sharing a slot
    (run % PARALLEL) run one after the other."""
    node, slot = f"ks{RUN}-a{run}", run % PARALLEL
    argv = [
        *CLI,
        "agent",
        "--node-name",
        node,
        "--no-pin",
        "--interval",
        "1h",
        "--otlp-timeout",
        f"{OTLP_TIMEOUT_S}s",
        "--otlp-endpoint",
        f"http://10.91.{RUN}.{4 * slot + 1}:{rx.port}",
        *(("--log-format", "json") if run % 2 == 0 else ()),
    ]
    log = logs / f"{node}.log"
    with log.open("w+") as err:
        proc = netns.popen_in(NODE_NS[slot], argv, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 120
            while not re.search("agent running", log.read_text()):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.02)
            time.sleep(random.Random(run).uniform(0.0, 0.05))
            signal_burst(proc.pid)
            sent = time.monotonic()
            try:
                code: int | None = proc.wait(OTLP_TIMEOUT_S + 30)  # far beyond: a hang, not a slow exit
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - sent
            if run % 2 == 0:
                records = [json.loads(line) for line in log.read_text().splitlines()]
                assert all({"time", "level", "logger", "msg"} <= r.keys() for r in records)
                assert any(r["msg"] == "agent running" and r.get("node") == node for r in records)
            return node, code, took
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_fifty_agents_survive_a_signal_burst_and_deliver_their_final_export(
    receiver: GrpcReceiver, tmp_path: Path
) -> None:
    def slot_runs(slot: int) -> list[tuple[str, int | None, float]]:
        return [_one(run, receiver, tmp_path) for run in range(slot, RUNS, PARALLEL)]

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = [r for runs in pool.map(slot_runs, range(PARALLEL)) for r in runs]
    hung = [node for node, code, _ in results if code is None]
    failed = [(node, code) for node, code, _ in results if code not in (None, 0)]
    slow = [(node, round(took, 2)) for node, code, took in results if code == 0 and took > OTLP_TIMEOUT_S]
    assert (hung, failed, slow) == ([], [], [])
    undelivered = {node for node, _, _ in results} - _nodes_delivered(receiver)
    assert undelivered == set()
