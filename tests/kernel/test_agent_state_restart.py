"""A real `otel-kzt agent` restarted after a failover resumes on the receiver it failed over to.

Two OTLP/gRPC receivers and the agent share one network namespace of this test ("ks" + run number), so
all traffic stays on that namespace's loopback. The agent's first rendezvous choice is down when it starts:
it fails over to the other one, which the pinned `agent_state` map records. The first choice comes back,
the agent is restarted (SIGTERM, new process): it stays on the receiver it was writing to. With the pin
removed, the same restart goes back to the first choice (the control: what the stored choice prevents).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from otel_kzt import netns, schema
from otel_kzt.agent import state
from otel_kzt.agent.datapath import bpfsys, pins
from otel_kzt.agent.datapath.bpfmap import BpfMap, u32
from otel_kzt.agent.export import rendezvous_rank
from otel_kzt.agent.transport import Target
from tests.support.processes import CLI
from tests.unit.test_agent_support import GrpcReceiver

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
NS = f"ks{RUN}-agent"
NODE = f"ks{RUN}-node"
PIN_ROOT = f"/sys/fs/bpf/ks{RUN}-pins"


class Start(Protocol):
    def __call__(self, endpoints: str, *extra: str) -> subprocess.Popen[bytes]: ...


class Receivers:
    """Two receivers listening inside the namespace: `first` is the agent's first rendezvous choice."""

    def __init__(self) -> None:
        a, b = GrpcReceiver("127.0.0.1:0"), GrpcReceiver("127.0.0.1:0")
        for receiver in (a, b):
            self.start(receiver)
        urls = {f"http://127.0.0.1:{r.port}": r for r in (a, b)}
        ranked = rendezvous_rank(NODE, [Target(url, "127.0.0.1", False) for url in urls])
        self.endpoints = ",".join(urls)
        self.first, self.second = (urls[t.url] for t in ranked)
        self.second_url = ranked[1].url

    @staticmethod
    def start(receiver: GrpcReceiver) -> None:
        with netns.entered(NS):  # the listening socket is made in this thread: it lives in NS
            receiver.start()

    def stop(self) -> None:
        self.first.stop()
        self.second.stop()


def from_node(receiver: GrpcReceiver) -> int:
    """Requests `receiver` got from this test's agent."""
    return sum(
        1
        for request in receiver.snapshot()
        for rm in request.resource_metrics
        if any(
            a.key == schema.RESOURCE_NODE_NAME and a.value.string_value == NODE
            for a in rm.resource.attributes
        )
    )


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def remove_pins() -> None:
    pins.cleanup(NODE, PIN_ROOT)
    shutil.rmtree(PIN_ROOT, ignore_errors=True)  # the empty pin root (bpffs: a plain directory)


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    with netns.Topology() as topo:
        topo.netns(NS)
        pins.cleanup(NODE, PIN_ROOT)  # leftovers of a crashed run
        topo.on_close("pins", remove_pins)
        recv = Receivers()
        topo.on_close("receivers", recv.stop)
        yield recv


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Start]:
    """Starts `otel-kzt agent` in NS; every process is stopped by the finalizer."""
    started: list[subprocess.Popen[bytes]] = []

    def start(endpoints: str, *extra: str) -> subprocess.Popen[bytes]:
        argv = [*CLI, "agent", "--node-name", NODE, "--pin-root", PIN_ROOT]
        argv += ["--interval", "0.3s", "--otlp-timeout", "1s", "--otlp-endpoint", endpoints, *extra]
        with (tmp_path / f"agent-{len(started)}.log").open("wb") as log:
            started.append(netns.popen_in(NS, argv, stdout=subprocess.DEVNULL, stderr=log))
        return started[-1]

    try:
        yield start
    finally:
        for proc in started:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def stored() -> int | None:
    with_map = BpfMap(bpfsys.obj_get(str(state.node_state_path(NODE, PIN_ROOT))), "test")
    try:
        return state.decode(with_map.lookup(u32(0)), "test")
    finally:
        with_map.close()


def restarted_goes_to(recv: Receivers, start: Start, *extra: str) -> GrpcReceiver:
    """Start the agent again and watch 3 exports: the one receiver they all went to."""
    counts = from_node(recv.first), from_node(recv.second)
    proc = start(recv.endpoints, *extra)
    wait_for(lambda: from_node(recv.first) + from_node(recv.second) >= sum(counts) + 3, 90, "3 exports")
    assert stop(proc) == 0
    grew = [r for r, before in zip((recv.first, recv.second), counts, strict=True) if from_node(r) > before]
    assert len(grew) == 1, "the restarted agent wrote to both receivers"
    return grew[0]


def test_restarted_agent_stays_on_the_receiver_it_failed_over_to(receivers: Receivers, agent: Start) -> None:
    recv = receivers
    recv.first.stop()  # the first choice is down when the agent starts: it fails over
    proc = agent(recv.endpoints)
    wait_for(lambda: from_node(recv.second) >= 2, 90, "exports to the second choice")
    assert stop(proc) == 0
    assert stored() == state.receiver_id(recv.second_url)

    Receivers.start(recv.first)  # the first choice is back (same port) and stays up
    assert restarted_goes_to(recv, agent) is recv.second
    # A changed map size resets the node's pinned datapath (every pin of the node goes): not this choice.
    assert restarted_goes_to(recv, agent, "--map-size", "4096") is recv.second
    assert stored() == state.receiver_id(recv.second_url)  # pinned again, for the next restart
    assert from_node(recv.first) == 0

    # The control: without the stored choice the same restart moves back to the first choice.
    state.node_state_path(NODE, PIN_ROOT).unlink()
    assert restarted_goes_to(recv, agent) is recv.first
    assert stored() == state.receiver_id(f"http://127.0.0.1:{recv.first.port}")
