"""Benchmark: what users feel of the agent, per datapath mode: pod-to-pod TCP bulk throughput and 64-byte
UDP packet rate with the agent running against without it, alternated in one run, medians of repeats.

    .venv/bin/python bench/datapath_overhead.py [--modes netfilter,tc,cgroup] [--repeats 9] [--seconds 1]
        [--conntrack] [--kube-proxy] [--aa] [--stats-only] [--stopped]

Topology: pod netns kdo-a -> node netns kdo-n (routed; the agent runs here) -> pod netns kdo-b. The real
`otel-kzt agent` (1 s interval, exporting to bench/otlp_sink.py in the node) runs for the whole of a mode's
measurements; "without" takes its attachments off the kernel (the links its pins hold are detached), "with"
attaches its own dispatcher again in the same place, so no restart (and no compile) sits between the two,
and pairs of short runs can alternate many times (off, on, on, off, ...): on a shared machine the noise is
larger than the effect, so the medians of many pairs are what count.

`--conntrack` makes the node track what it forwards, as every Kubernetes node does (kube-proxy, a CNI's
policy): the path without the agent grows by conntrack's work, and the netfilter program reads what
conntrack recorded for every packet (bpf/origin.h), which it skips on an untracked node. `--kube-proxy`
adds kube-proxy's nftables-mode rules (Service DNAT, masquerade), so the node's netfilter hooks run for
every packet whether the agent is there or not, as on a real node.

Where the cost goes, per mode: the counting program's own ns/packet (kernel.bpf_stats_enabled:
run_time_ns / run_cnt of kzt_dispatch + kzt_count), and the agent's CPU seconds per second, idle and
while each state's traffic ran. `--stopped` adds a fourth state, the links detached and the agent stopped
(SIGSTOP): a node without the agent, so off/stopped is what the agent process's own work (its intervals,
competing for the node's CPUs) costs the traffic, apart from the program's. Beside the noisy pairs, a
figure that holds on a shared VM: the program's CPU (bpf_stats) as a share of the CPU the traffic kept
busy (/proc/stat), which is what it costs traffic that is CPU-bound, as this VM's is (the hook's own entry,
outside bpf_stats, is in floor/off only). Targets (issue 13): TCP >= 99 %,
UDP >= 97 % of without. Needs root; names start "kdo".
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otel_kzt import netns  # noqa: E402
from otel_kzt.agent.config import DEFAULT_INTERVAL_S  # noqa: E402
from otel_kzt.agent.datapath import bpfsys, cgroup, modes, netfilter, pins, probe, tc, tclinks  # noqa: E402
from tests.support.processes import CLI, stop  # noqa: E402

NODE, POD_A, POD_B = "kdo-n", "kdo-a", "kdo-b"
A, B = "10.79.1.2", "10.79.2.2"
TCP_PORT, UDP_PORT = 5201, 5202
UDP_PAYLOAD = 64 - 20 - 8  # 64-byte IP packets
CGROUP = Path("/sys/fs/cgroup/unified/kdo-bench")
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
INTERVAL_S = 1.0


# --- traffic roles (run inside the pods as `python bench/datapath_overhead.py --role ...`) ----------


def role_tcp_sink(port: int) -> None:
    with socket.create_server(("", port)) as server:
        print("listening", flush=True)
        while True:
            conn, _ = server.accept()
            buf = bytearray(1 << 20)
            with conn:
                while conn.recv_into(buf):
                    pass


def role_tcp_send(dst: str, port: int, seconds: float) -> None:
    chunk = b"x" * (1 << 18)
    sent = 0
    with socket.create_connection((dst, port)) as sock:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            sock.sendall(chunk)
            sent += len(chunk)
    print(json.dumps({"bytes": sent, "seconds": elapsed}))


def role_udp_send(dst: str, port: int, seconds: float) -> None:
    payload = b"u" * UDP_PAYLOAD
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((dst, port))
        send = sock.send
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            for _ in range(256):
                try:  # noqa: SIM105 (the cheaper form in the hot loop)
                    send(payload)
                except OSError:
                    pass
            sent += 256
    print(json.dumps({"sent": sent, "seconds": elapsed}))


# --- the bench ---------------------------------------------------------------------------------------


# As on a Kubernetes node (kube-proxy, a CNI's policy): conntrack tracks what the node forwards, and the
# netfilter program then reads what it records (bpf/origin.h) for every packet.
NODE_CONNTRACK = """table inet kdo {
    chain forward {
        type filter hook forward priority 0;
        ct state established,related,new counter accept
    }
}"""


# As on a node where kube-proxy runs in nftables mode (Kubernetes >= 1.31; iptables mode registers the
# same hooks): Service VIPs DNAT-ed at prerouting and output through a verdict map, masquerade at
# postrouting for marked packets, conntrack on everything. The nat chains run for a connection's first
# packet only; each later packet pays conntrack and the nat hooks' fast path, and the agent's netfilter
# program joins hooks that already run at POSTROUTING, as on a real node.
NODE_KUBE_PROXY = f"""table ip kube-proxy {{
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ 10.96.0.10 . udp . 53 : goto service-dns,
                     10.96.7.7 . tcp . {TCP_PORT} : goto service-b }}
    }}
    chain service-dns {{ meta mark set meta mark | 0x4000; meta l4proto udp dnat to {B}:53; }}
    chain service-b {{ meta l4proto tcp dnat to {B}:{TCP_PORT}; }}
    chain services {{ ip daddr . meta l4proto . th dport vmap @service-ips; }}
    chain nat-prerouting {{ type nat hook prerouting priority dstnat; jump services; }}
    chain nat-output {{ type nat hook output priority -100; jump services; }}
    chain masquerading {{
        meta mark & 0x4000 == 0 return
        meta mark set meta mark ^ 0x4000
        masquerade fully-random
    }}
    chain nat-postrouting {{ type nat hook postrouting priority srcnat; jump masquerading; }}
    chain filter-forward {{
        type filter hook forward priority -110;
        ct state invalid drop
    }}
}}"""


def build(topo: netns.Topology, conntrack: bool, kube_proxy: bool = False, udp_ports: int = 1) -> None:
    """The three netns; pod B drops UDP to `udp_ports` ports from UDP_PORT on (no ICMP errors back)."""
    for ns in (NODE, POD_A, POD_B):
        topo.netns(ns)
    topo.veth(NODE, "kdon0", POD_A, "eth0", a_addrs=["10.79.1.1/24"], b_addrs=[f"{A}/24"])
    topo.veth(NODE, "kdon1", POD_B, "eth0", a_addrs=["10.79.2.1/24"], b_addrs=[f"{B}/24"])
    topo.route(POD_A, "default", via="10.79.1.1")
    topo.route(POD_B, "default", via="10.79.2.1")
    netns.enable_forwarding(NODE)
    ports = f"{UDP_PORT}-{UDP_PORT + udp_ports - 1}" if udp_ports > 1 else str(UDP_PORT)
    script = f"""table inet kdo {{
        counter kdoudp {{ }}
        chain input {{
            type filter hook input priority 0;
            udp dport {ports} counter name kdoudp drop
        }}
    }}"""
    netns.run_in(POD_B, ["nft", "-f", "-"], input=script)
    if conntrack:
        netns.run_in(NODE, ["nft", "-f", "-"], input=NODE_CONNTRACK)
    if kube_proxy:
        netns.run_in(NODE, ["nft", "-f", "-"], input=NODE_KUBE_PROXY)


def udp_received() -> int:
    out = netns.run_in(POD_B, ["nft", "-j", "list", "counter", "inet", "kdo", "kdoudp"]).stdout
    item = next(i for i in json.loads(out)["nftables"] if "counter" in i)
    return int(item["counter"]["packets"])


def role(ns: str, *args: object) -> dict[str, float]:
    argv = [sys.executable, __file__, "--role", *map(str, args)]
    out = netns.run_in(ns, argv, timeout=600).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def measure(seconds: float) -> tuple[float, float]:
    """(TCP bytes/s, UDP packets/s received) for `seconds` each."""
    tcp = role(POD_A, "tcp-send", B, TCP_PORT, seconds)
    before = udp_received()
    udp = role(POD_A, "udp-send", B, UDP_PORT, seconds)
    return tcp["bytes"] / tcp["seconds"], (udp_received() - before) / udp["seconds"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; idle, iowait and steal left out)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def prog_stats(fd: int) -> tuple[int, int]:
    info = bpfsys.prog_info(fd)
    return info.run_time_ns, info.run_cnt


# What lets a packet on at each mode's hook, for the floor (NF_ACCEPT, TCX_NEXT, allow).
FLOOR_RETURN = {"netfilter": 1, "tc": -1, "cgroup": 1}


def attach(mode: str, prog: int, info: bpfsys.LinkInfo, before: bool = False) -> int:
    """A link running `prog` where the agent's link `info` runs it (`before`: netfilter runs it first)."""
    with netns.entered(NODE):
        if mode == "netfilter":
            try:
                return netfilter.link_create_netfilter(prog, info.pf, info.priority - int(before))
            except bpfsys.BpfCallError as exc:  # source NAT's hook holds the place before (--kube-proxy)
                if not before or exc.errno != errno.EBUSY:
                    raise
                return netfilter.link_create_netfilter(prog, info.pf, info.priority + 1)
        if mode == "tc":  # tcx puts each new link first
            return tclinks.tcx_attach(prog, info.pf, f"ifindex {info.pf}")
        return cgroup.link_create_cgroup(prog, str(CGROUP))


class Toggle:
    """Takes the running agent's attachments off the kernel and puts its dispatcher back, same place; and
    the floor (bpf/floor.c, an empty program of the mode's type) at the same hooks, on its own or beside."""

    def __init__(self, mode: str) -> None:
        from bcc import BPF  # only the floor needs bcc in this process

        self.mode = mode
        directory = pins.node_dir(NODE, pins.DEFAULT_PIN_ROOT)
        owner = modes.MODES[mode]
        self.pinned = [bpfsys.obj_get(str(p)) for p in sorted(directory.iterdir()) if owner.owns_pin(p.name)]
        self.infos = [bpfsys.link_info(fd) for fd in self.pinned]
        self.progs = [bpfsys.prog_fd_by_id(info.prog_id) for info in self.infos]
        # one program behind all of a mode's links: its stats once
        self.measured = list({i.prog_id: fd for i, fd in zip(self.infos, self.progs, strict=True)}.values())
        self.floor_bpf = BPF(src_file=str(probe.FLOOR_SOURCE).encode(),
                             cflags=[f"-DKZT_FLOOR_RETURN={FLOOR_RETURN[mode]}"])  # fmt: skip
        self.floor = int(
            self.floor_bpf.load_func(b"kzt_floor", owner.prog_type, attach_type=owner.attach_type).fd
        )
        self.ours: list[int] = []
        self.floors: list[int] = []
        self.released: list[int] = []
        self.alt_fd: int | None = None  # a variant of the counter (bench/datapath_udp.py --alt)
        self.alts: list[int] = []
        self.on = True

    def set(self, on: bool) -> None:
        if on == self.on:
            return
        if not on:
            for fd in self.pinned:  # the agent's own links, the first time
                bpfsys.link_detach(fd)
            self.pinned, self.released = [], self.released + self.pinned
            bpfsys.close_links(self.ours, detach=True)
            self.ours = []
        else:
            self.ours = [
                attach(self.mode, prog, info) for info, prog in zip(self.infos, self.progs, strict=True)
            ]
        self.on = on

    def set_floor(self, on: bool) -> None:
        if on and not self.floors:
            self.floors = [attach(self.mode, self.floor, info, before=True) for info in self.infos]
        elif not on:
            bpfsys.close_links(self.floors, detach=True)
            self.floors = []

    def set_alt(self, on: bool) -> None:
        """The variant program (`alt_fd`, attached where the agent's links are) on or off."""
        if on and not self.alts and self.alt_fd is not None:
            self.alts = [attach(self.mode, self.alt_fd, info) for info in self.infos]
        elif not on:
            bpfsys.close_links(self.alts, detach=True)
            self.alts = []

    def state(self, name: str) -> None:
        """'off' (neither), 'floor' (the floor alone), 'on' (the agent's program alone), 'alt' (the
        variant alone)."""
        self.set(name == "on")
        self.set_floor(name == "floor")
        self.set_alt(name == "alt")

    def close(self) -> None:
        self.state("off")
        for fd in self.pinned + self.released + self.progs:
            os.close(fd)
        self.floor_bpf.cleanup()


class ClassicToggle:
    """Toggle's states for tc mode on classic clsact filters (the agent run with tc.CLASSIC_ENV): "off" has
    no clsact qdisc on the hooked devices (as without the agent), "on" the agent's pinned dispatcher as a
    direct-action cls_bpf filter, the floor a filter at a lower preference (it runs first)."""

    def __init__(self, mode: str) -> None:
        from bcc import BPF

        self.mode = mode
        directory = pins.node_dir(NODE, pins.DEFAULT_PIN_ROOT)
        self.pins = sorted(str(p) for p in directory.iterdir() if p.name.startswith(tc.PIN_PREFIX))
        self.devices = [tc.device_of_pin(Path(p).name) for p in self.pins]
        self.progs = [bpfsys.obj_get(p) for p in self.pins]
        self.measured = self.progs[:1]  # one dispatcher behind every filter
        self.floor_bpf = BPF(src_file=str(probe.FLOOR_SOURCE).encode(),
                             cflags=[f"-DKZT_FLOOR_RETURN={FLOOR_RETURN[mode]}"])  # fmt: skip
        self.floor = int(self.floor_bpf.load_func(b"kzt_floor", tc.BPF_PROG_TYPE_SCHED_CLS).fd)
        self.floor_pin = f"/sys/fs/bpf/kdo-floor-{os.getpid()}"
        bpfsys.obj_pin(self.floor, self.floor_pin)
        self.on, self.floor_on = True, False

    def _apply(self, on: bool, floor: bool) -> None:
        if (on, floor) == (self.on, self.floor_on):
            return
        cmds = []
        for dev in self.devices:
            if self.on or self.floor_on:
                cmds.append(f"qdisc del dev {dev} clsact")
            if on or floor:
                cmds.append(f"qdisc add dev {dev} clsact")
            if floor:
                cmds.append(f"filter add dev {dev} egress pref 1 bpf direct-action pinned {self.floor_pin}")
            if on:
                pin = self.pins[self.devices.index(dev)]
                cmds.append(f"filter add dev {dev} egress pref 2 handle {hex(tclinks.CLASSIC_HANDLE)} "
                            f"bpf direct-action pinned {pin}")  # fmt: skip
        if cmds:
            netns.run_in(NODE, ["tc", "-batch", "-"], input="\n".join(cmds) + "\n")
        self.on, self.floor_on = on, floor

    def set_floor(self, on: bool) -> None:
        self._apply(self.on, on)

    def state(self, name: str) -> None:
        self._apply(name == "on", name == "floor")

    def close(self) -> None:
        self.state("off")
        for fd in self.progs:
            os.close(fd)
        os.unlink(self.floor_pin)
        self.floor_bpf.cleanup()


AnyToggle = Toggle | ClassicToggle


def toggle_for(mode: str) -> AnyToggle:
    """The mode's Toggle; tc's classic filters (the agent told so by tc.CLASSIC_ENV) get their own."""
    if mode == "tc" and os.environ.get(tc.CLASSIC_ENV) == "1":
        return ClassicToggle(mode)
    return Toggle(mode)


@contextlib.contextmanager
def agent(mode: str, sink_port: int, log_path: Path, extra: tuple[str, ...] = ()) -> Iterator[int]:
    pins.cleanup(NODE)  # a previous run's
    argv = [*CLI, "agent", *extra, "--node-name", NODE,
            "--interval", f"{INTERVAL_S}s", "--datapath", mode, "--tc-devices", "kdon0,kdon1",
            "--cgroup-root", str(CGROUP), "--health-endpoint", "127.0.0.1:9465",
            "--otlp-endpoint", f"http://127.0.0.1:{sink_port}"]  # fmt: skip
    with log_path.open("wb") as log:  # one log per start: its first export is what is waited for
        proc = netns.popen_in(NODE, argv, stdout=subprocess.DEVNULL, stderr=log, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 180
        while b"export: flows=" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent ({mode}) did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc.pid
    finally:
        stop(proc)
        pins.cleanup(NODE)


def ns_per_run(
    groups: dict[str, list[int]], run: Callable[[], object]
) -> tuple[dict[str, tuple[float, int]], float]:
    """Per group of programs (summed over its hooks): ns per run while `run` sends, and the runs; and the
    machine's busy CPU seconds meanwhile, at most the run's wall time."""
    before = {name: [prog_stats(fd) for fd in fds] for name, fds in groups.items()}
    busy, started = busy_seconds(), time.monotonic()
    run()
    # At most the wall time: traffic bound by one CPU loses what the program takes there, whatever else runs.
    busy = min(busy_seconds() - busy, time.monotonic() - started)
    result = {}
    for name, fds in groups.items():
        deltas = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(map(prog_stats, fds), before[name], strict=True)]
        runs = sum(d[1] for d in deltas)
        result[name] = (sum(d[0] for d in deltas) / max(1, runs), runs)
    return result, busy


def where_the_cost_goes(toggle: Toggle, pid: int) -> dict[str, float]:
    """With the agent's program and the floor both attached (the floor first, same packets): each one's
    ns per run over a 1 s UDP run and a 1 s TCP run (one run per GSO packet) with bpf_stats on (off while
    throughput is measured: the stats' clock reads cost too); and the agent's CPU per interval with no
    traffic (with traffic, softirq time is charged to whatever task runs)."""
    toggle.state("on")
    toggle.set_floor(True)
    cost: dict[str, float] = {}
    STATS_SYSCTL.write_text("1")
    try:
        groups = {"program": toggle.measured, "floor": [toggle.floor]}
        for proto, args in (("udp", ("udp-send", B, UDP_PORT, 1.0)), ("tcp", ("tcp-send", B, TCP_PORT, 1.0))):
            stats, busy = ns_per_run(groups, functools.partial(role, POD_A, *args))
            for name, (ns, runs) in stats.items():
                cost[f"{proto}_{name}_ns"], cost[f"{proto}_{name}_runs"] = ns, runs
            # What the traffic kept busy, the floor's own runs taken off (it is attached only to be timed).
            cost[f"{proto}_busy_s"] = busy - stats["floor"][0] * stats["floor"][1] / 1e9
            cost[f"{proto}_program_share"] = (
                stats["program"][0] * stats["program"][1] / 1e9 / cost[f"{proto}_busy_s"]
            )
    finally:
        STATS_SYSCTL.write_text("0")
        toggle.set_floor(False)
    cpu, started = cpu_seconds(pid), time.monotonic()
    time.sleep(3 * INTERVAL_S)
    cost["agent_cpu_s"] = (cpu_seconds(pid) - cpu) / (time.monotonic() - started) * INTERVAL_S
    return cost


STATES = ("off", "floor", "on")
STOPPED = "stopped"  # --stopped: off, and the agent process stopped too


@contextlib.contextmanager
def agent_stopped(pid: int, stopped: bool) -> Iterator[None]:
    if stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)


def spread(values: list[float]) -> str:
    """Median [25th - 75th percentile] of per-run ratios, in %."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{statistics.median(values) * 100:.1f} [{q[0] * 100:.1f}-{q[2] * 100:.1f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="netfilter,tc,cgroup")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument(
        "--aa", action="store_true", help="A/A run: 'on' and 'floor' stay detached too (the method's noise)"
    )
    parser.add_argument("--stats-only", action="store_true", help="only the programs' ns/run, no throughput")
    parser.add_argument(
        "--conntrack", action="store_true", help="the node tracks connections, as a Kubernetes node does"
    )
    parser.add_argument(
        "--stopped",
        action="store_true",
        help="also measure with the agent's process stopped (no agent at all)",
    )
    parser.add_argument(
        "--kube-proxy", action="store_true",
        help="the node also has kube-proxy's nftables rules (Service DNAT, masquerade): a real node's hooks",
    )  # fmt: skip
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        name, rest = args.role[0], args.role[1:]
        if name == "tcp-sink":
            role_tcp_sink(int(rest[0]))
        elif name == "tcp-send":
            role_tcp_send(rest[0], int(rest[1]), float(rest[2]))
        else:
            role_udp_send(rest[0], int(rest[1]), float(rest[2]))
        return 0
    log_path = Path(f"/tmp/kdo-agent-{os.getpid()}.log")
    old_stats = STATS_SYSCTL.read_text().strip()
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cgroup.procs").write_text(str(os.getpid()))  # the pods' senders are below the root
    with contextlib.ExitStack() as stack:
        stack.callback(CGROUP.rmdir)
        stack.callback(lambda: (CGROUP.parent / "cgroup.procs").write_text(str(os.getpid())))
        topo = stack.enter_context(netns.Topology())
        build(topo, args.conntrack, args.kube_proxy)
        sink = netns.popen_in(NODE, [sys.executable, str(ROOT / "bench" / "otlp_sink.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        stack.callback(sink.wait)
        stack.callback(sink.stdin.close)  # type: ignore[union-attr]
        sink_port = int(sink.stdout.readline())  # type: ignore[union-attr]
        server = netns.popen_in(POD_B, [sys.executable, __file__, "--role", "tcp-sink", str(TCP_PORT)],
                                stdout=subprocess.PIPE)  # fmt: skip
        stack.callback(server.wait)
        stack.callback(server.kill)
        assert server.stdout is not None and b"listening" in server.stdout.readline()
        STATS_SYSCTL.write_text("0")
        stack.callback(STATS_SYSCTL.write_text, old_stats)
        measure(1.0)  # warm up
        results = []
        states = (*STATES, STOPPED) if args.stopped else STATES
        for mode in args.modes.split(","):
            runs: dict[str, list[tuple[float, float]]] = {state: [] for state in states}
            agent_cpu: dict[str, list[float]] = {state: [] for state in states}
            with agent(mode, sink_port, log_path) as pid:
                toggle = Toggle(mode)
                try:
                    costs = [where_the_cost_goes(toggle, pid)]
                    for i in range(0 if args.stats_only else args.repeats):
                        k = i % len(states)
                        order = states[k:] + states[:k]  # each state in each place in turn
                        for state in order if i % 2 == 0 else reversed(order):
                            toggle.state("off" if args.aa or state == STOPPED else state)
                            with agent_stopped(pid, state == STOPPED and not args.aa):
                                cpu, started = cpu_seconds(pid), time.monotonic()
                                runs[state].append(measure(args.seconds))
                                agent_cpu[state].append(
                                    (cpu_seconds(pid) - cpu) / (time.monotonic() - started)
                                )
                    costs.append(where_the_cost_goes(toggle, pid))
                finally:
                    toggle.close()
            cost = {key: statistics.median(c[key] for c in costs) for key in costs[0]}
            line: dict[str, object] = {"mode": mode}
            digits = {
                "agent_cpu_s": 3,
                "udp_busy_s": 3,
                "tcp_busy_s": 3,
                "udp_program_share": 5,
                "tcp_program_share": 5,
            }
            line.update({key: round(value, digits.get(key, 1)) for key, value in cost.items()})
            for proto in ("udp", "tcp"):  # with the traffic CPU-bound, what the program's CPU costs it
                share = cost[f"{proto}_program_share"]
                line[f"{proto}_program_pct"] = round(100 * share, 2)
                line[f"{proto}_bound_on_vs_off"] = round(100 * (1 - share), 2)
                for key, interval in (("", INTERVAL_S), ("_default_interval", DEFAULT_INTERVAL_S)):
                    agent_share = cost["agent_cpu_s"] / interval / cost[f"{proto}_busy_s"]
                    line[f"{proto}_bound_vs_no_agent{key}"] = round(100 * (1 - share - agent_share), 2)
            for proto in ("udp", "tcp"):
                line[f"{proto}_ratio_to_floor"] = round(
                    cost[f"{proto}_program_ns"] / cost[f"{proto}_floor_ns"], 2
                )
            if not args.stats_only:
                for j, (proto, unit, scale) in enumerate((("tcp", "MBps", 1e6), ("udp", "kpps", 1e3))):
                    off = [r[j] for r in runs["off"]]
                    line[f"{proto}_off_{unit}"] = round(statistics.median(off) / scale, 1)
                    for state in ("floor", "on"):
                        pairs = [b[j] / a[j] for a, b in zip(runs["off"], runs[state], strict=True)]
                        line[f"{proto}_{state}_vs_off"] = spread(pairs)
                        line[f"{proto}_{state}_pairs"] = [round(x, 4) for x in pairs]  # to pool runs
                    if args.stopped:
                        for state in ("off", "on"):
                            pairs = [b[j] / a[j] for a, b in zip(runs[STOPPED], runs[state], strict=True)]
                            line[f"{proto}_{state}_vs_stopped"] = spread(pairs)
                            line[f"{proto}_{state}_stopped_pairs"] = [round(x, 4) for x in pairs]
                for state in states:  # the agent's CPU s per s while each state's traffic ran
                    line[f"agent_cpu_{state}"] = round(statistics.median(agent_cpu[state]), 4)
            results.append(line)
            print(json.dumps(line), flush=True)
    for r in results:
        text = (
            f"{r['mode']:9s} program/floor ns per run: UDP {r['udp_program_ns']}/{r['udp_floor_ns']} "
            f"({r['udp_ratio_to_floor']}x)  TCP {r['tcp_program_ns']}/{r['tcp_floor_ns']} "
            f"({r['tcp_ratio_to_floor']}x)  agent CPU {r['agent_cpu_s']} s/interval"
        )
        text += "\n          from the CPU the traffic kept busy (1 s runs, bpf_stats): " + "  ".join(
            f"{proto.upper()} busy {r[f'{proto}_busy_s']} s, program "
            f"{r[f'{proto}_program_pct']} % of it -> on/off {r[f'{proto}_bound_on_vs_off']} %, "
            f"with the agent's CPU {r[f'{proto}_bound_vs_no_agent']} % ("
            f"{r[f'{proto}_bound_vs_no_agent_default_interval']} % at its default "
            f"{DEFAULT_INTERVAL_S:g} s interval)"
            for proto in ("tcp", "udp")
        )
        if not args.stats_only:
            text += (
                f"\n          with/without %: TCP {r['tcp_on_vs_off']} (target 99; floor alone "
                f"{r['tcp_floor_vs_off']})  UDP {r['udp_on_vs_off']} (target 97; floor alone "
                f"{r['udp_floor_vs_off']})"
            )
            text += "\n          agent CPU s/s under traffic: " + " ".join(
                f"{state} {r[f'agent_cpu_{state}']}" for state in states
            )
            if args.stopped:
                text += (
                    f"\n          against the agent stopped %: off TCP {r['tcp_off_vs_stopped']} UDP "
                    f"{r['udp_off_vs_stopped']}  on TCP {r['tcp_on_vs_stopped']} UDP {r['udp_on_vs_stopped']}"
                )
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
