"""Benchmark: what the agent's interval work costs the sender's 64-byte UDP rate (issue 13).

The interval's work: the map read, the slot flushes by IPI, eviction and the re-insertion it causes;
measured as the shape of the sender's rate over the interval.

    .venv/bin/python bench/datapath_interval.py [--modes cgroup] [--shapes bulk,churn] [--seconds 120]
        [--window 0.01] [--chunk 3] [--pods-known] [--conntrack] [--flows 5000] [--cpu 1]

The bed is datapath_udp.py's: one sender pinned to `--cpu`, in whose context the packet's whole path runs,
pod B's receive counter, the real agent at a 1 s interval with its program attached. The sender runs
windows of `--window` s back to back; per window, its CPU ns per packet received and the agent's CPU time
in it (the agent's process clock: all its threads). Chunks of `--chunk` s alternate (ABBA) the agent
running and stopped (SIGSTOP: it reads nothing, flushes no slot, evicts nothing).

Per running chunk, the sender's CPU per packet over the whole chunk against its quiet windows' (those at
least QUIET_S after the agent's interval work began: a window where the agent used over BUSY_NS): what
the interval's first QUIET_S take on top of the quiet rate ("running over its quiet"), and by phase (time
since the work began) each phase's slowdown and its share of the sender's CPU. And each running chunk's
CPU per packet against the adjacent stopped chunk's ("running over stopped", the median over pairs with a
bootstrap 95 % interval): everything the running agent costs the sender, spread over the whole interval
or not; and the same in wall-clock time per packet (what the agent's own run on the sender's CPU takes
from it too, and whatever else ran there). The agent's CPU per second beside.

`--pods-known`: the agent is given a metadata file naming pod A a pod of this node, so pod A's flows are
its own and stay in the map until idle, as on a node whose pods send. Without it (datapath_udp.py's bed)
nothing names pod A and every flow leaves the map at the interval it is seen (LocalFlows.leaves_now), as
forwarded traffic does: churn's 5,000 flows are then evicted and inserted again every interval.
Needs root; names start "kdo".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datapath_overhead import agent, agent_stopped
from bench.datapath_udp import Sender, bed, bed_arguments, median_ci, pods_known_args, shapes_of

BUSY_NS = 1_000_000  # the agent's CPU in a window that marks its interval's work
QUIET_S = 0.3  # a running chunk's quiet rate: its windows this long after the work began
PHASES = (0.0, 0.02, 0.05, 0.1, 0.3)  # phase bins' lower ends, s since the work began

Window = dict[str, float]  # t (monotonic start), cpu_s and wall_s (sender), received, agent_ns


def process_cpu_ns(pid: int) -> int:
    """Another process's CPU time, all threads (its CPUCLOCK_SCHED process clock)."""
    return time.clock_gettime_ns((~pid << 3) | 2)


def windows(sender: Sender, pid: int, seconds: float, window: float) -> list[Window]:
    out: list[Window] = []
    end = time.monotonic() + seconds
    while (t := time.monotonic()) < end:
        before = process_cpu_ns(pid)
        run = sender.run(window)
        out.append({"t": t, "cpu_s": run["cpu_s"], "wall_s": run["seconds"], "received": run["received"],
                    "agent_ns": process_cpu_ns(pid) - before})  # fmt: skip
    return out


def phases(ws: list[Window]) -> list[float | None]:
    """Each window's time since the agent's last interval work began (None before the first)."""
    out: list[float | None] = []
    began, busy_before = None, False
    for w in ws:
        busy = w["agent_ns"] > BUSY_NS
        if busy and not busy_before:
            began = w["t"]
        busy_before = busy
        out.append(None if began is None else w["t"] - began)
    return out


def ns(w: Window) -> float:
    return w["cpu_s"] / max(1.0, w["received"]) * 1e9


def chunk_rates(ws: list[Window], running: bool) -> tuple[float, float, dict[float, list[float]]] | None:
    """(sender CPU s per packet over the chunk, over its quiet windows, per phase bin [CPU s, the quiet
    rate's CPU s for the bin's packets]); None without enough quiet windows. Stopped: every window is
    quiet."""
    ph = phases(ws) if running else [QUIET_S] * len(ws)
    quiet = [w for w, p in zip(ws, ph, strict=True) if p is not None and p >= QUIET_S]
    if len(quiet) < 10:
        return None
    base = sum(w["cpu_s"] for w in quiet) / max(1.0, sum(w["received"] for w in quiet))
    mean = sum(w["cpu_s"] for w in ws) / max(1.0, sum(w["received"] for w in ws))
    bins: dict[float, list[float]] = {b: [0.0, 0.0] for b in PHASES}
    for w, p in zip(ws, ph, strict=True):
        if running and p is not None:
            b = max(lo for lo in PHASES if p >= lo)
            bins[b][0] += w["cpu_s"]
            bins[b][1] += base * w["received"]
    return mean, base, bins


def measure(sender: Sender, pid: int, args: argparse.Namespace) -> dict[str, object]:
    """Chunks running and stopped in ABBA order; running minus stopped per adjacent pair."""
    sender.run(1.0)
    load, started = os.getloadavg()[0], time.monotonic()
    got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}  # (mean, quiet) CPU s per packet
    pairs: list[float] = []
    wall: dict[bool, list[float]] = {True: [], False: []}  # wall s per packet
    wall_pairs: list[float] = []
    bins = {b: [0.0, 0.0] for b in PHASES}
    agent_cpu = agent_s = 0.0
    order = (True, False, False, True)
    for i in range(2 * max(1, round(args.seconds / args.chunk / 2))):
        running = order[i % 4]
        with agent_stopped(pid, not running):
            ws = windows(sender, pid, args.chunk, args.window)
        rates = chunk_rates(ws, running)
        if rates is None:
            continue
        got[running].append(rates[:2])
        wall[running].append(sum(w["wall_s"] for w in ws) / max(1.0, sum(w["received"] for w in ws)))
        if running:
            for b, (cpu, quiet) in rates[2].items():
                bins[b][0] += cpu
                bins[b][1] += quiet
            agent_cpu += sum(w["agent_ns"] for w in ws) * 1e-9
            agent_s += args.chunk
        if i % 2 == 1 and len(got[True]) == len(got[False]):
            pairs.append(100 * (got[True][-1][0] / got[False][-1][0] - 1))
            wall_pairs.append(100 * (wall[True][-1] / wall[False][-1] - 1))
    binned = sum(cpu for cpu, _ in bins.values())
    excess = [100 * (mean / quiet - 1) for mean, quiet in got[True]]
    return {
        "pods_known": args.pods_known,
        "pairs": len(pairs),
        "running_over_stopped_pct": [round(x, 2) for x in median_ci(pairs)] if pairs else None,
        "wall_running_over_stopped_pct": [round(x, 2) for x in median_ci(wall_pairs)] if pairs else None,
        "running_over_its_quiet_pct": [round(x, 2) for x in median_ci(excess)] if excess else None,
        "by_phase": {
            f"{lo * 1e3:.0f}ms": {
                "slowdown_pct": round(100 * (cpu / quiet - 1), 1) if quiet else None,
                "share_of_cpu_pct": round(100 * (cpu - quiet) / max(binned, 1e-9), 2),
            }
            for lo, (cpu, quiet) in bins.items()
        },
        "stopped_ns_per_pkt": round(statistics.median(m for m, _ in got[False]) * 1e9, 1)
        if got[False]
        else None,
        "agent_cpu_s_per_s": round(agent_cpu / max(agent_s, 1e-9), 3),
        "load": [round(load, 2), round(os.getloadavg()[0], 2)],
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="cgroup")
    bed_arguments(parser)
    parser.add_argument("--seconds", type=float, default=120.0, help="per mode and shape")
    parser.add_argument("--window", type=float, default=0.01, help="one timed window")
    parser.add_argument("--chunk", type=float, default=3.0, help="s of agent running, then stopped")
    args = parser.parse_args()
    shapes = shapes_of(args)
    with contextlib.ExitStack() as stack:
        senders, sink_port = stack.enter_context(bed(args, shapes))
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdo-interval-")))
        extra = pods_known_args(directory) if args.pods_known else ()
        for mode in args.modes.split(","):
            with agent(mode, sink_port, directory / "agent.log", extra) as pid:
                for shape, sender in senders.items():
                    line = measure(sender, pid, args)
                    line.update(mode=mode, shape=shape, flows=shapes[shape])
                    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
