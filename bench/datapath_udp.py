"""Benchmark: the 64-byte UDP packet rate with the agent attached against without, per datapath mode, to
a precision that can decide issue 13's target (>= 97 %) on a shared 2-core machine.

    .venv/bin/python bench/datapath_udp.py [--modes netfilter,tc,cgroup] [--shapes bulk,churn]
        [--blocks 800] [--seconds 0.025] [--flows 5000] [--cpu 1] [--conntrack] [--kube-proxy]
        [--no-write-combine] [--aa] [--alt DIR[:-DFLAG,...]] [--tc-classic] [--pods-known]

Why not datapath_overhead.py's rounds: each of its runs starts a new sender on whatever CPU is free, and
its pairs of 1 s runs vary by +-5-10 %, against an effect of 1-3 %. Here, on the same topology and agent:
- one sender process per shape for the whole run, pinned to `--cpu`: the packet's whole path (the send,
  the veth backlogs, forwarding and the hook at the node, the drop at pod B) runs in its context, there;
- blocks of four short runs (25 ms: the rate drifts over seconds, so close neighbours compare best),
  `off`, `aa` (off again: the method's own noise), `floor`, `on`, in the four orders of a Williams square
  (each state at each place and after each other state once in four blocks), each run after 10 ms sent
  untimed in its state; per block, each state's rate over off's;
- two rates per run, of the packets that reached pod B (its eth0 counter; the sender's successful sends
  give the drops): per second of wall clock, and per second of the sender's CPU time ("cpu": this kernel
  has no IRQ time accounting, so the softirq work done in the sender's context is its own). The second
  leaves out the time other tasks of the shared machine take from that CPU: the rate an idle core reaches.
- the median over blocks of the ratios, with a bootstrap 95 % interval; kernel.bpf_stats_enabled is off
  during every timed run (checked: it adds two clock reads per program run).
Shapes: `bulk`, one flow (one connected socket); `churn`, every packet another flow (the destination port
round-robin over `--flows` ports: ephemeral source ports never enter a flow key, count.h), so each packet
flushes the CPU's write-combining slot into the map, their worst case. `--no-write-combine` builds the
agent's program without the slots (probe.NO_WRITE_COMBINE_ENV). `--pods-known`: the agent is told
pod A is a pod of this node (pods_known_args), so its flows stay in the map until idle instead of
leaving at every interval. Program and floor ns per run (bpf_stats on, both attached, the floor first)
before and after each shape's blocks. Needs root; names start "kdo".
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datapath_overhead import (
    CGROUP,
    NODE,
    POD_A,
    POD_B,
    STATS_SYSCTL,
    UDP_PAYLOAD,
    UDP_PORT,
    A,
    AnyToggle,
    B,
    agent,
    build,
    ns_per_run,
    toggle_for,
)
from otel_kzt import netns
from otel_kzt.agent.datapath import probe, tc
from otel_kzt.agent.datapath.bpfmap import BpfMap
from tests.support.k8s_objects import make_node, make_pod

STATES = ("off", "aa", "floor", "on")
# A Williams square: over four blocks every state follows every other once, so what a state leaves behind
# for the next run (a link's detach, its caches) weighs on each state alike.
ORDERS = tuple(tuple(STATES[(k + i) % 4] for i in (0, 1, 3, 2)) for k in range(4))
SETTLE_S = 0.01  # sent, not timed, after each switch: the switch's own after-effects land there
BATCH = 256  # sends between clock reads
WARMUP_BLOCKS = 2


def role_udp_loop(dst: str, port: int, flows: int, cpu: int) -> None:
    """Pinned to `cpu`; for each line on stdin (seconds), sends for that long and prints one JSON line."""
    os.sched_setaffinity(0, {cpu})
    payload = b"u" * UDP_PAYLOAD
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if flows == 1:
        sock.connect((dst, port))
        send = sock.send
    else:  # one packet per flow in turn: `flows` destination ports, a whole number of batches per cycle
        cycle = [(dst, port + i) for i in range(flows)] * (BATCH // math.gcd(flows, BATCH))
        batches = itertools.cycle([cycle[i : i + BATCH] for i in range(0, len(cycle), BATCH)])
        sendto = sock.sendto
    print("ready", flush=True)
    for line in sys.stdin:
        seconds = float(line)
        sent = failed = 0
        cpu0, start = time.thread_time(), time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if flows == 1:
                for _ in range(BATCH):
                    try:
                        send(payload)
                    except OSError:
                        failed += 1
            else:
                for addr in next(batches):
                    try:
                        sendto(payload, addr)
                    except OSError:
                        failed += 1
            sent += BATCH
        cpu_s = time.thread_time() - cpu0
        print(json.dumps({"sent": sent - failed, "seconds": elapsed, "cpu_s": cpu_s}), flush=True)


class Sender:
    """The pinned sender of one shape in pod A, and pod B's eth0 receive counter."""

    def __init__(self, flows: int, cpu: int, receiver_pid: int) -> None:
        argv = [sys.executable, __file__, "--role", B, str(UDP_PORT), str(flows), str(cpu)]
        self.proc = netns.popen_in(POD_A, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.stdin: IO[bytes] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        assert self.stdout.readline() == b"ready\n"
        self.net_dev = Path(f"/proc/{receiver_pid}/net/dev")

    def received(self) -> int:
        for line in self.net_dev.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "eth0":
                return int(rest.split()[1])
        raise RuntimeError("pod B has no eth0")

    def run(self, seconds: float) -> dict[str, float]:
        before = self.received()
        self.stdin.write(f"{seconds}\n".encode())
        self.stdin.flush()
        result: dict[str, float] = json.loads(self.stdout.readline())
        result["received"] = self.received() - before
        return result

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=30)


def net_rx_per_cpu() -> list[int]:
    line = next(x for x in Path("/proc/softirqs").read_text().splitlines() if x.strip().startswith("NET_RX"))
    return [int(v) for v in line.split()[1:]]


def cost(toggle: AnyToggle, sender: Sender) -> tuple[float, float, list[int]]:
    """Program and floor ns per run over 1 s of the shape (both attached, bpf_stats on only here), and the
    share of NET_RX softirqs on the sender's CPU (the path stays on it)."""
    toggle.state("on")
    toggle.set_floor(True)
    STATS_SYSCTL.write_text("1")
    rx = net_rx_per_cpu()
    try:
        stats = ns_per_run({"program": toggle.measured, "floor": [toggle.floor]}, lambda: sender.run(1.0))
    finally:
        STATS_SYSCTL.write_text("0")
        toggle.set_floor(False)
    rx = [a - b for a, b in zip(net_rx_per_cpu(), rx, strict=True)]
    return stats["program"][0], stats["floor"][0], rx


def median_ci(values: list[float], reps: int = 2000) -> tuple[float, float, float]:
    """The median and its bootstrap 95 % interval (percentile method, fixed seed)."""
    rng = random.Random(13)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    return statistics.median(values), meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


Run = dict[str, float]  # one timed run: sent, received, seconds, cpu_s, stats_on


def blocks(toggle: AnyToggle, sender: Sender, n: int, seconds: float, aa: bool) -> list[dict[str, Run]]:
    """`n` blocks (after WARMUP_BLOCKS not kept) of one run per state, in ORDERS' orders in turn."""
    out = []
    for i in range(WARMUP_BLOCKS + n):
        block = {}
        for state in ORDERS[i % len(ORDERS)]:
            if state == "aa" and toggle.alt_fd is not None:
                toggle.state("alt")
            else:
                toggle.state("off" if aa or state == "aa" else state)
            sender.run(SETTLE_S)
            run = sender.run(seconds)
            run["stats_on"] = float(STATS_SYSCTL.read_text().strip() != "0")
            block[state] = run
        if i >= WARMUP_BLOCKS:
            out.append(block)
    return out


def summarise(rounds: list[dict[str, Run]]) -> dict[str, object]:
    """Per estimator, each state's ratio to off (median, 95 % interval, quartiles); ns per packet apart."""
    line: dict[str, object] = {}
    rate: dict[str, Callable[[Run], float]] = {
        "wall": lambda r: r["received"] / r["seconds"],
        "cpu": lambda r: r["received"] / r["cpu_s"],
    }
    for est, f in rate.items():
        line[f"off_kpps_{est}"] = round(statistics.median(f(b["off"]) for b in rounds) / 1e3, 1)
        for state in ("aa", "floor", "on"):
            ratios = [f(b[state]) / f(b["off"]) for b in rounds]
            med, lo, hi = median_ci(ratios)
            q = statistics.quantiles(ratios, n=4)
            line[f"{state}_{est}"] = [round(100 * x, 2) for x in (med, lo, hi)]
            line[f"{state}_{est}_iqr"] = [round(100 * q[0], 1), round(100 * q[2], 1)]
        for a, b_ in (("on", "floor"), ("on", "aa")):
            ratios = [f(b[a]) / f(b[b_]) for b in rounds]
            line[f"{a}_{b_}_{est}"] = [round(100 * x, 2) for x in median_ci(ratios)]
    ns = {s: [r[s]["cpu_s"] / r[s]["received"] * 1e9 for r in rounds] for s in ("off", "floor", "on")}
    line["off_ns_per_pkt_cpu"] = round(statistics.median(ns["off"]), 1)
    ns["aa"] = [r["aa"]["cpu_s"] / r["aa"]["received"] * 1e9 for r in rounds]
    for a, b in (("on", "off"), ("floor", "off"), ("on", "floor"), ("on", "aa")):
        diff = [x - y for x, y in zip(ns[a], ns[b], strict=True)]
        line[f"ns_{a}_minus_{b}"] = [round(x, 1) for x in median_ci(diff)]
    runs = [r for b in rounds for r in b.values()]
    line["drop_pct"] = round(100 * statistics.median(1 - r["received"] / r["sent"] for r in runs), 3)
    line["stats_on_runs"] = sum(bool(r["stats_on"]) for r in runs)
    return line


def measure_shape(toggle: AnyToggle, sender: Sender, args: argparse.Namespace) -> dict[str, object]:
    """One mode's blocks for one shape, the programs' ns per run before and after, and the load."""
    sender.run(1.0)  # warm up
    load, started = os.getloadavg()[0], time.monotonic()
    costs = [cost(toggle, sender)]
    rounds = blocks(toggle, sender, args.blocks, args.seconds, args.aa)
    costs.append(cost(toggle, sender))
    line: dict[str, object] = {"write_combine": not args.no_write_combine, "blocks": args.blocks}
    line["tc_classic"] = args.tc_classic
    line["alt"] = args.alt
    line["seconds"] = args.seconds
    program = statistics.median(c[0] for c in costs)
    floor = statistics.median(c[1] for c in costs)
    line.update(program_ns=round(program, 1), floor_ns=round(floor, 1))
    line["over_floor_ns"] = round(program - floor, 1)
    rx = [sum(per_cpu) for per_cpu in zip(*(c[2] for c in costs), strict=True)]
    line["net_rx_on_cpu_pct"] = round(100 * rx[args.cpu] / max(1, sum(rx)), 1)
    line.update(summarise(rounds))
    line["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    line["elapsed_s"] = round(time.monotonic() - started, 1)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="netfilter,tc,cgroup")
    parser.add_argument("--blocks", type=int, default=800)
    parser.add_argument("--seconds", type=float, default=0.025, help="one timed run")
    bed_arguments(parser)
    parser.add_argument("--no-write-combine", action="store_true", help="the program without the slots")
    parser.add_argument("--aa", action="store_true", help="every state detached (the method's noise)")
    parser.add_argument(
        "--alt",
        help="DIR[:-DFLAG,...]: a counter built from another bpf/ directory "
        "takes the aa state's place (aa is then alt/off): two programs in one run",
    )
    parser.add_argument("--tc-classic", action="store_true", help="tc: classic clsact filters, not tcx")
    parser.add_argument("--role", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role_udp_loop(args.role[0], int(args.role[1]), int(args.role[2]), int(args.role[3]))
        return 0
    if args.no_write_combine:
        os.environ[probe.NO_WRITE_COMBINE_ENV] = "1"  # the agent's loader reads it
    if args.tc_classic:
        os.environ[tc.CLASSIC_ENV] = "1"  # the agent's tc mode reads it; so does toggle_for
    shapes = shapes_of(args)
    with contextlib.ExitStack() as stack:
        senders, sink_port = stack.enter_context(bed(args, shapes))
        log_path = Path(f"/tmp/kdo-agent-{os.getpid()}.log")
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdo-udp-")))
        extra = pods_known_args(directory) if args.pods_known else ()
        for mode in args.modes.split(","):
            with agent(mode, sink_port, log_path, extra):
                toggle = toggle_for(mode)
                if args.alt:
                    alt_bpf, toggle.alt_fd = build_alt(mode, args.alt)
                    stack.callback(alt_bpf.cleanup)
                try:
                    for shape, sender in senders.items():
                        line = measure_shape(toggle, sender, args)
                        line.update(mode=mode, shape=shape, flows=shapes[shape])
                        print(json.dumps(line), flush=True)
                        print(text(line), flush=True)
                finally:
                    toggle.close()
    return 0


def bed_arguments(parser: argparse.ArgumentParser) -> None:
    """The bed's flags (bed(), shapes(), pods_known_args())."""
    parser.add_argument("--shapes", default="bulk,churn")
    parser.add_argument("--flows", type=int, default=5000, help="churn: flows round-robin")
    parser.add_argument("--cpu", type=int, default=1, help="the sender's CPU")
    parser.add_argument("--conntrack", action="store_true", help="the node tracks connections")
    parser.add_argument("--kube-proxy", action="store_true", help="the node has kube-proxy's rules")
    parser.add_argument("--pods-known", action="store_true", help="the agent knows pod A as this node's")


def shapes_of(args: argparse.Namespace) -> dict[str, int]:
    """Each shape asked for and its flows: bulk one, churn --flows."""
    shapes = {"bulk": 1, "churn": args.flows}
    return {s: shapes[s] for s in args.shapes.split(",")}


@contextlib.contextmanager
def bed(args: argparse.Namespace, shapes: dict[str, int]) -> Iterator[tuple[dict[str, Sender], int]]:
    """The topology (args.conntrack, args.kube_proxy), the OTLP sink, pod B's counter, bpf_stats off and
    one pinned sender per shape (flows) on args.cpu; yields the senders and the sink's port."""
    old_stats = STATS_SYSCTL.read_text().strip()
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cgroup.procs").write_text(str(os.getpid()))  # the senders are below the cgroup root
    with contextlib.ExitStack() as stack:
        stack.callback(CGROUP.rmdir)
        stack.callback(lambda: (CGROUP.parent / "cgroup.procs").write_text(str(os.getpid())))
        topo = stack.enter_context(netns.Topology())
        build(topo, args.conntrack, args.kube_proxy, udp_ports=max(shapes.values()))
        sink = netns.popen_in(NODE, [sys.executable, str(Path(__file__).parent / "otlp_sink.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        stack.callback(sink.wait)
        stack.callback(sink.stdin.close)  # type: ignore[union-attr]
        sink_port = int(sink.stdout.readline())  # type: ignore[union-attr]
        receiver = netns.popen_in(POD_B, ["sleep", "infinity"])  # pod B's /proc/<pid>/net/dev
        stack.callback(receiver.wait)
        stack.callback(receiver.kill)
        STATS_SYSCTL.write_text("0")
        stack.callback(STATS_SYSCTL.write_text, old_stats)
        senders = {}
        for shape, flows in shapes.items():
            senders[shape] = Sender(flows, args.cpu, receiver.pid)
            stack.callback(senders[shape].close)
        yield senders, sink_port


def pods_known_args(directory: Path) -> tuple[str, ...]:
    """The agent's flags for a metadata file naming this node and pod A on it (a Kubernetes List): pod A's
    flows are then the agent's own and stay in the map until idle, as a node's pods' do. Without it
    nothing names pod A, and every flow leaves the map at the interval it is first seen
    (LocalFlows.leaves_now), as forwarded traffic does."""
    items = [make_node(NODE, ["10.79.1.1"]), make_pod("kdo-a", NODE, [A])]
    path = directory / "metadata.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return ("--kube-metadata", str(path))


def build_alt(mode: str, spec: str) -> tuple[object, int]:
    """The counter (kzt_count, no dispatcher) of `mode` built by bcc from the bpf/ directory of `spec`
    with its extra flags, as the agent would build it (default map size and ports, unpinned maps)."""
    from bcc import BPF

    from otel_kzt.agent import config
    from otel_kzt.agent.datapath import cgroup as cgroup_mode
    from otel_kzt.agent.datapath import flowtables

    directory, _, flags = spec.partition(":")
    owner: object = tc.TcMode(["kdon0", "kdon1"]) if mode == "tc" else cgroup_mode.CgroupMode(str(CGROUP))
    if mode not in ("tc", "cgroup"):
        raise SystemExit("--alt: tc or cgroup")
    saved = probe.BPF_DIR
    probe.BPF_DIR = Path(directory)
    try:
        with netns.entered(NODE):
            features = probe.probe(owner)  # type: ignore[arg-type]
        cflags = probe.flow_cflags(
            features, map_size=config.DEFAULT_MAP_SIZE, ephemeral_min=config.DEFAULT_EPHEMERAL[0],
            ephemeral_max=config.DEFAULT_EPHEMERAL[1], evict_batch=flowtables.EVICT_BATCH,
            dying_size=flowtables.DYING_SIZE, pin_dir=None,
        ) + [f for f in flags.split(",") if f]  # fmt: skip
        bpf = BPF(text=probe.program_text(owner).encode(), cflags=cflags)  # type: ignore[arg-type]
    finally:
        probe.BPF_DIR = saved
    kind = owner.prog_type, owner.attach_type  # type: ignore[attr-defined]  (tc's is -1: none)
    fd = int(bpf.load_func(b"kzt_count", kind[0], attach_type=kind[1]).fd)
    try:
        maps = [BpfMap(os.dup(bpf[name.encode()].map_fd), name) for name in tc.DEV_MAPS]
    except KeyError:  # a source before the per-device flags, or cgroup
        return bpf, fd
    if isinstance(owner, tc.TcMode):
        dev = tc.DeviceConfig(*maps)
        try:
            owner.configure(dev, [])  # the devices' flags, as the agent's loader writes them
        finally:
            dev.close()
    return bpf, fd


def text(r: dict[str, object]) -> str:
    def cell(key: str) -> str:
        med, lo, hi = cast(list[float], r[key])  # a median_ci triple
        return f"{med:.2f} [{lo:.2f}-{hi:.2f}]"

    return (
        f"{r['mode']:9s} {r['shape']:5s} classic={r['tc_classic']!s:5s} wc={r['write_combine']!s:5s} "
        f"on/off cpu {cell('on_cpu')} "
        f"wall {cell('on_wall')} | floor/off cpu {cell('floor_cpu')} | aa cpu {cell('aa_cpu')} "
        f"wall {cell('aa_wall')} | over floor {r['over_floor_ns']} ns (bpf_stats), "
        f"on-floor {cell('ns_on_minus_floor')} ns (cpu) | off {r['off_kpps_cpu']} kpps cpu, "
        f"{r['off_kpps_wall']} wall; load {r['load']}"
        + (
            f"\n  alt={r['alt']}: on/alt cpu {cell('on_aa_cpu')}, on-alt {cell('ns_on_minus_aa')} ns"
            if r["alt"]
            else ""
        )
    )


if __name__ == "__main__":
    sys.exit(main())
