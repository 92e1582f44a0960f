"""A datapath mode the kernel cannot run, through the real `otel-kzt agent` (DESIGN §3a, issue 13).

The kernel here runs every mode, so the probe's test seam (`probe.ABSENT_ENV`) takes away the one kernel
capability each mode checks for, as a kernel without it would show its BTF; everything after the probe is
real. `--datapath netfilter|tc|cgroup` made unable to run: exit 1, exactly one line on stderr naming what
is missing, and nothing left attached or pinned (bpffs, BPF links, tc filters as before the run; the
receiver state the agent pinned before its datapath start is withdrawn too). `--datapath auto` with
netfilter taken away starts `tc` and logs why; with tc taken away as well, one line names both reasons.
Each case runs pinned (the default) and with `--no-pin`, which must pin nothing, leave nothing attached
once it exits (no `--cleanup` needed) and fail the same way. A start that fails leaves a receiver choice an
earlier run stored as it was, pinned or not (it was not made stale: nothing was exported).

    root netns  km<run>r ═══ km<run>u  km<run>-n (the agent; default route via the root netns)
                10.68.<run>.1/30       10.68.<run>.2/30
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import auto, cleanup, pins, tc
from otel_kzt.agent.datapath.probe import ABSENT_ENV
from otel_kzt.agent.state import node_state_path, open_node_store, receiver_id
from tests.support import processes
from tests.support.nodenet import node_behind_veth
from tests.support.processes import CLI, stop

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
NS, UPLINK = f"km{RUN}-n", f"km{RUN}u"
ROOT_IP, NODE_IP = f"10.68.{RUN}.1", f"10.68.{RUN}.2"
BPFFS = Path("/sys/fs/bpf")
NO_NETFILTER = "kernel has no netfilter BPF programs/links (Linux >= 6.4 needed)"
NO_CLASSIFIER = "kernel has no BPF classifiers (BPF_PROG_TYPE_SCHED_CLS)"
NO_CGROUP_EGRESS = "kernel has no cgroup socket egress programs (BPF_CGROUP_INET_EGRESS)"
MISSING = {  # mode -> (the capability taken away, the line the agent must print)
    "netfilter": ("BPF_NETFILTER", NO_NETFILTER),
    "tc": ("BPF_PROG_TYPE_SCHED_CLS", NO_CLASSIFIER),
    "cgroup": ("BPF_CGROUP_INET_EGRESS", NO_CGROUP_EGRESS),
    "cgroup-link": ("BPF_LINK_TYPE_CGROUP", "kernel has no cgroup BPF links (Linux >= 5.7)"),
}
PINNING = {"pinned": (), "no-pin": ("--no-pin",)}  # the agent flags of each way to run


@pytest.fixture
def node() -> Iterator[str]:
    """The node namespace, its pins removed before and after (also when the test failed)."""
    cleanup(NS, pins.DEFAULT_PIN_ROOT)
    with netns.Topology() as topo:
        node_behind_veth(topo, NS, f"km{RUN}", ROOT_IP, NODE_IP)
        topo.route(NS, "default", via=ROOT_IP)  # the uplink tc mode hooks
        try:
            yield NS
        finally:
            cleanup(NS, pins.DEFAULT_PIN_ROOT)


def argv(datapath: str, *extra: str, agent: tuple[str, ...] = ()) -> list[str]:
    return [*CLI, *extra, "agent", *agent, "--node-name", NS, "--datapath", datapath,
            "--interval", "0.5s", "--otlp-timeout", "1s",
            "--otlp-endpoint", f"http://{ROOT_IP}:4317"]  # fmt: skip


def env(*absent: str) -> dict[str, str]:
    return {**os.environ, ABSENT_ENV: ",".join(absent)}


def kernel_state() -> tuple[frozenset[str], frozenset[int], str, frozenset[int]]:
    """What a run could leave behind: every bpffs path, every BPF link id, the uplink's tc filters, and
    the session's running descendants (a session-scoped stack of earlier tests may still be running)."""
    paths = frozenset(str(p) for p in BPFFS.rglob("*"))
    listed = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True)
    links = frozenset(int(link["id"]) for link in json.loads(listed.stdout or "[]"))
    filters = netns.run_in(NS, ["tc", "filter", "show", "dev", UPLINK, "egress"]).stdout
    running = frozenset(p.pid for p in processes.leftovers(os.getpid()))
    return paths, links, filters, running


def assert_nothing_left(
    before: tuple[frozenset[str], frozenset[int], str, frozenset[int]], *, node_dir: bool = False
) -> None:
    """Nothing new in bpffs, no new BPF link, no tc filter; the node's pin directory only if it was
    there before (`node_dir`: an earlier run's stored receiver)."""
    paths, links, filters, _ = kernel_state()
    assert pins.node_dir(NS).exists() == node_dir
    assert paths - before[0] == set(), "pinned after the run"
    assert links - before[1] == set(), "BPF links left attached"
    assert filters == before[2] == "", "tc filters left on the uplink"
    running = processes.leftovers(os.getpid())
    # what the processes running before start meanwhile is theirs (a CI run caught an earlier test's stack
    # mid-fork: a child of one of them, no command line yet); the agent's own, orphans included, are
    # re-parented to this session, never to them
    theirs, grew = set(before[3]), True
    while grew:
        mine = [p for p in running if p.pid not in theirs]
        grew = any(p.ppid in theirs for p in mine)
        theirs.update(p.pid for p in mine if p.ppid in theirs)
    assert mine == [], "processes left running"


@pytest.mark.parametrize("pinning", list(PINNING))
@pytest.mark.parametrize("mode", list(MISSING))
def test_a_mode_that_cannot_run_exits_with_one_line_naming_what_is_missing(
    node: str, mode: str, pinning: str
) -> None:
    absent, line = MISSING[mode]
    before = kernel_state()
    # WARNING: the INFO lines of a normal start (health endpoint, state pinned) are not what is checked
    datapath = mode.split("-", maxsplit=1)[0]
    command = argv(datapath, "--log-level", "WARNING", agent=PINNING[pinning])
    done = netns.run_in(node, command, env=env(absent), timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"otel-kzt agent: {line}"]
    assert done.stdout == ""
    assert_nothing_left(before)


@pytest.mark.parametrize("pinning", list(PINNING))
def test_a_failed_start_keeps_the_receiver_an_earlier_run_stored(node: str, pinning: str) -> None:
    earlier = receiver_id(f"http://{ROOT_IP}:4317")
    store = open_node_store(NS)
    assert store is not None
    try:
        store.save(earlier)
    finally:
        store.close()
    before = kernel_state()
    command = argv("netfilter", "--log-level", "WARNING", agent=PINNING[pinning])
    done = netns.run_in(node, command, env=env("BPF_NETFILTER"), timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"otel-kzt agent: {NO_NETFILTER}"]
    assert_nothing_left(before, node_dir=True)
    assert node_state_path(NS).exists(), "an earlier run's stored receiver removed by a failed start"
    kept = open_node_store(NS)
    assert kept is not None
    try:
        assert kept.load() == earlier
    finally:
        kept.close()


@pytest.mark.parametrize("pinning", list(PINNING))
def test_auto_without_netfilter_starts_tc_and_logs_why(node: str, tmp_path: Path, pinning: str) -> None:
    before = kernel_state()
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        command = argv("auto", agent=PINNING[pinning])
        proc = netns.popen_in(node, command, env=env("BPF_NETFILTER"), stdout=log, stderr=log)
    try:
        want = f"datapath auto: using tc (netfilter: {NO_NETFILTER})"
        deadline = time.monotonic() + 90
        while want not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        logged = log_path.read_text()
        warned = f"WARNING {auto.__name__} datapath auto: netfilter cannot run here: {NO_NETFILTER}"
        assert warned in logged
        filters = netns.run_in(NS, ["tc", "filter", "show", "dev", UPLINK, "egress"]).stdout
        if pinning == "pinned":
            pinned = {p.name for p in pins.node_dir(NS).iterdir()}
            assert tc.pin_name(UPLINK) in pinned and not pinned & {"link_v4", "link_v6"}, pinned
        else:  # attached (a tcx link, or a classic filter), pinned nowhere
            assert not pins.node_dir(NS).exists()
            assert kernel_state()[0] == before[0], "--no-pin pinned something"
            assert kernel_state()[1] - before[1] or filters, "tc attached nothing"
        assert stop(proc) == 0, log_path.read_text()
    finally:
        stop(proc)
    if pinning == "pinned":
        cleaned = netns.run_in(node, [*CLI, "agent", "--cleanup", "--node-name", NS], timeout=60, check=False)
        assert cleaned.returncode == 0, cleaned.stderr
    assert_nothing_left(before)  # --no-pin: detached by the agent's own exit


@pytest.mark.parametrize("pinning", list(PINNING))
def test_auto_when_no_mode_can_run_names_every_reason_in_one_line(node: str, pinning: str) -> None:
    before = kernel_state()
    done = netns.run_in(
        node,
        # the WARNING per mode tried is the log of why (above)
        argv("auto", "--log-level", "ERROR", agent=PINNING[pinning]),
        env=env("BPF_NETFILTER", "BPF_PROG_TYPE_SCHED_CLS"),
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    reasons = f"netfilter: {NO_NETFILTER}; tc: {NO_CLASSIFIER}"
    assert done.stderr.splitlines() == [f"otel-kzt agent: no datapath can run here: {reasons}"]
    assert_nothing_left(before)
