"""Pins that last: a real `otel-kzt agent` with pinning on, started in private mount namespaces.

- without a bpffs (`/sys/fs/bpf` unmounted in the namespace, as in a container without the hostPath mount
  or under `ip netns exec`), or with a bpffs of its own mounted there, it refuses to start with one line
  naming the mount it needs; it pins nothing and mounts nothing; with `--no-pin` the same namespace runs;
- with the host's bpffs (a copied mount namespace: the same superblock) it runs, and a restart in another
  such namespace keeps the series: the same start time, and the packets sent while no agent ran counted.

    root netns: OTLP receiver  ── kp<run>r ═══ kp<run>u ──  kp<run>-n (the agent; IPv6 off)
                10.93.<run>.1/30                             10.93.<run>.2/30
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otel_kzt import netns, schema
from otel_kzt.agent.datapath import pins
from tests.support.nodenet import node_behind_veth
from tests.support.processes import CLI, stop
from tests.unit.test_agent_support import GrpcReceiver, points

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
NS = f"kp{RUN}-n"
NODE = f"kp{RUN}-node"
ROOT_IP, NODE_IP = f"10.93.{RUN}.1", f"10.93.{RUN}.2"
PIN_ROOT = f"/sys/fs/bpf/kp{RUN}-pins"
PORT = 5301
DATAGRAM = 20 + 8 + 100  # IPv4 + UDP headers + payload
TRAFFIC = str(Path(__file__).with_name("traffic.py"))
NO_BPFFS = "umount -l /sys/fs/bpf && "
OWN_BPFFS = "umount -l /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf && "


def remove_pins() -> None:
    pins.cleanup(NODE, PIN_ROOT)
    shutil.rmtree(PIN_ROOT, ignore_errors=True)


@pytest.fixture(scope="module")
def receiver() -> Iterator[GrpcReceiver]:
    rx = GrpcReceiver("0.0.0.0:0")
    with netns.Topology() as topo:
        node_behind_veth(topo, NS, f"kp{RUN}", ROOT_IP, NODE_IP)
        remove_pins()  # leftovers of a crashed run
        topo.on_close("pins", remove_pins)
        rx.start()
        topo.on_close("otlp receiver", rx.stop)
        yield rx


def agent_argv(receiver: GrpcReceiver, *extra: str) -> list[str]:
    return [*CLI, "agent", "--node-name", NODE, "--pin-root", PIN_ROOT,
            "--interval", "0.3s", "--otlp-timeout", "1s", "--health-endpoint", "",
            "--otlp-endpoint", f"http://{ROOT_IP}:{receiver.port}", *extra]  # fmt: skip


def in_private_mounts(setup: str, argv: list[str]) -> list[str]:
    """`argv` in a new mount namespace (private: nothing done there reaches the host) and in NS, after
    the shell commands `setup` ran there."""
    quoted = " ".join(f"'{a}'" for a in argv)
    enter = ["nsenter", f"--net={netns.netns_path(NS)}", "sh", "-c", f"{setup}exec {quoted}"]
    return ["unshare", "--mount", "--propagation", "private", "--", *enter]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        with (tmp_path / f"agent-{len(procs)}.log").open("wb") as log:
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log))
        return procs[-1]

    try:
        yield start
    finally:
        for proc in procs:
            stop(proc)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def series(receiver: GrpcReceiver) -> list[dict[str, object]]:
    """This test's flow (node -> root, UDP to PORT) in every export so far, oldest first."""
    flow = {schema.DESTINATION_PORT: PORT, schema.SOURCE_ADDRESS: NODE_IP}
    return [p for p in points(receiver.snapshot(), schema.FLOW_BYTES) if flow.items() <= p.items()]


def exports(receiver: GrpcReceiver) -> int:
    """Requests of this test's node so far (its datapath is attached once one arrived)."""
    return sum(1 for request in receiver.snapshot() for rm in request.resource_metrics
               if any(a.key == schema.RESOURCE_NODE_NAME and a.value.string_value == NODE
                      for a in rm.resource.attributes))  # fmt: skip


def send(count: int) -> None:
    out = netns.run_in(NS, [sys.executable, TRAFFIC, "udp", ROOT_IP, str(PORT), str(count), "100"]).stdout
    assert json.loads(out.strip().splitlines()[-1])["sent"] == count


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        (NO_BPFFS, "it is not on a bpffs in this mount namespace"),
        (OWN_BPFFS, "/sys/fs/bpf is a bpffs of this mount namespace only"),
    ],
    ids=["no-bpffs", "own-bpffs"],
)
def test_a_private_mount_namespace_without_the_hosts_bpffs_is_refused(
    receiver: GrpcReceiver, setup: str, why: str
) -> None:
    done = subprocess.run(in_private_mounts(setup, agent_argv(receiver)), capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"otel-kzt agent: pins under {PIN_ROOT} would die with this agent ({why}): it needs the host's "
        "bpffs mounted on /sys/fs/bpf (in a container: a hostPath volume of /sys/fs/bpf), or run with "
        "--no-pin"
    ]
    assert not Path(PIN_ROOT).exists()  # nothing pinned, nothing attached


def test_no_pin_runs_in_a_private_mount_namespace(
    receiver: GrpcReceiver, started: Callable[[list[str]], subprocess.Popen[bytes]]
) -> None:
    before = exports(receiver)
    proc = started(in_private_mounts(NO_BPFFS, agent_argv(receiver, "--no-pin")))
    wait_for(lambda: exports(receiver) >= before + 2 or proc.poll() is not None, "two exports")
    assert proc.poll() is None, "the --no-pin agent stopped"
    assert stop(proc) == 0
    assert not Path(PIN_ROOT).exists()


def test_with_the_hosts_bpffs_a_restart_keeps_series_and_start_times(
    receiver: GrpcReceiver, started: Callable[[list[str]], subprocess.Popen[bytes]]
) -> None:
    before = exports(receiver)
    first = started(in_private_mounts("", agent_argv(receiver)))  # a copy of the host's mounts
    wait_for(lambda: exports(receiver) > before, "the first export (attached)")
    assert pins.node_dir(NODE, PIN_ROOT).is_dir()  # pinned in the host's bpffs
    send(5)
    wait_for(lambda: any(p["_value"] == 5 * DATAGRAM for p in series(receiver)), "5 datagrams exported")
    start_time = series(receiver)[-1]["_start"]
    assert stop(first) == 0
    send(7)  # while no agent runs: the pinned program counts them
    second = started(in_private_mounts("", agent_argv(receiver)))
    wait_for(lambda: series(receiver)[-1]["_value"] == 12 * DATAGRAM, "all 12 datagrams exported")
    assert {p["_start"] for p in series(receiver)} == {start_time}  # one series, never restarted
    assert stop(second) == 0
