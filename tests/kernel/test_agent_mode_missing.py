"""A datapath mode the kernel cannot run, through the real `otel-kzt agent` (DESIGN §3a, issue 13).

The kernel here runs every mode, so the probe's test seam (`probe.ABSENT_ENV`) takes away the one kernel
capability each mode checks for, as a kernel without it would show its BTF; everything after the probe is
real. `--datapath netfilter|tc|cgroup` made unable to run: exit 1, exactly one line on stderr naming what
is missing, and nothing left attached or pinned (bpffs, BPF links, tc filters as before the run; the
receiver state the agent pinned before its datapath start is withdrawn too). `--datapath auto` with
netfilter taken away starts `tc` and logs why; with tc taken away as well, one line names both reasons.

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


def argv(datapath: str, *extra: str) -> list[str]:
    return [*CLI, *extra, "agent", "--node-name", NS, "--datapath", datapath,
            "--interval", "0.5s", "--otlp-timeout", "1s",
            "--otlp-endpoint", f"http://{ROOT_IP}:4317"]  # fmt: skip


def env(*absent: str) -> dict[str, str]:
    return {**os.environ, ABSENT_ENV: ",".join(absent)}


def kernel_state() -> tuple[frozenset[str], frozenset[int], str]:
    """What a run could leave behind: every bpffs path, every BPF link id, the uplink's tc filters."""
    paths = frozenset(str(p) for p in BPFFS.rglob("*"))
    listed = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True)
    links = frozenset(int(link["id"]) for link in json.loads(listed.stdout or "[]"))
    filters = netns.run_in(NS, ["tc", "filter", "show", "dev", UPLINK, "egress"]).stdout
    return paths, links, filters


def assert_nothing_left(before: tuple[frozenset[str], frozenset[int], str]) -> None:
    paths, links, filters = kernel_state()
    assert not pins.node_dir(NS).exists()
    assert paths - before[0] == set(), "pinned after the run"
    assert links - before[1] == set(), "BPF links left attached"
    assert filters == before[2] == "", "tc filters left on the uplink"


@pytest.mark.parametrize("mode", list(MISSING))
def test_a_mode_that_cannot_run_exits_with_one_line_naming_what_is_missing(node: str, mode: str) -> None:
    absent, line = MISSING[mode]
    before = kernel_state()
    # WARNING: the INFO lines of a normal start (health endpoint, state pinned) are not what is checked
    datapath = mode.split("-", maxsplit=1)[0]
    command = argv(datapath, "--log-level", "WARNING")
    done = netns.run_in(node, command, env=env(absent), timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"otel-kzt agent: {line}"]
    assert done.stdout == ""
    assert_nothing_left(before)


def test_auto_without_netfilter_starts_tc_and_logs_why(node: str, tmp_path: Path) -> None:
    before = kernel_state()
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = netns.popen_in(node, argv("auto"), env=env("BPF_NETFILTER"), stdout=log, stderr=log)
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
        pinned = {p.name for p in pins.node_dir(NS).iterdir()}
        assert tc.pin_name(UPLINK) in pinned and not pinned & {"link_v4", "link_v6"}, pinned
        assert stop(proc) == 0, log_path.read_text()
    finally:
        stop(proc)
    done = netns.run_in(node, [*CLI, "agent", "--cleanup", "--node-name", NS], timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert_nothing_left(before)


def test_auto_when_no_mode_can_run_names_every_reason_in_one_line(node: str) -> None:
    before = kernel_state()
    done = netns.run_in(
        node,
        argv("auto", "--log-level", "ERROR"),  # the WARNING per mode tried is the log of why (above)
        env=env("BPF_NETFILTER", "BPF_PROG_TYPE_SCHED_CLS"),
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    reasons = f"netfilter: {NO_NETFILTER}; tc: {NO_CLASSIFIER}"
    assert done.stderr.splitlines() == [f"otel-kzt agent: no datapath can run here: {reasons}"]
    assert_nothing_left(before)
