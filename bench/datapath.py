"""Benchmark: ns per packet of the flow program against a floor program at the same hook, same traffic,
same run (kernel.bpf_stats_enabled: run_time_ns / run_cnt of each program).

    .venv/bin/python bench/datapath.py [--seconds 3] [--churn-flows 5000] [--ipv6]

Topology: pod netns -> node netns (both programs attached at POSTROUTING) -> sink netns (drops the UDP,
so no ICMP errors come back). Two shapes: bulk (4 flows, long bursts) and churn (N flows round-robin).
Prints one line per shape and the ratios; targets: bulk <= 1.5x, churn <= 3x the floor.
Not a test: numbers depend on the machine. Needs root. Resource names start with "kdb".
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otel_kzt import netns
from otel_kzt.agent.datapath import Datapath, DatapathConfig, bpfsys, netfilter, probe
from otel_kzt.agent.datapath.netfilter import LINK_PRIORITY

TRAFFIC = str(Path(__file__).resolve().parents[1] / "tests" / "kernel" / "traffic.py")
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
NODE, POD, SINK = "kdb-node", "kdb-pod", "kdb-sink"


def build(topo: netns.Topology) -> None:
    for ns in (NODE, POD, SINK):
        topo.netns(ns)
    topo.veth(
        NODE,
        "kdbn0",
        POD,
        "eth0",
        a_addrs=["10.78.1.1/24", "fd78:1::1/64"],
        b_addrs=["10.78.1.2/24", "fd78:1::2/64"],
    )
    topo.veth(
        NODE,
        "kdbn1",
        SINK,
        "eth0",
        a_addrs=["10.78.2.1/24", "fd78:2::1/64"],
        b_addrs=["10.78.2.2/24", "fd78:2::2/64"],
    )
    for ns, gw4, gw6 in ((POD, "10.78.1.1", "fd78:1::1"), (SINK, "10.78.2.1", "fd78:2::1")):
        topo.route(ns, "default", via=gw4)
        topo.route(ns, "default", via=gw6)
    netns.enable_forwarding(NODE)
    script = (
        "table inet kdb { chain input { type filter hook input priority 0; meta l4proto udp drop\n }\n}\n"
    )
    netns.run_in(SINK, ["nft", "-f", "-"], input=script)


def attach_floor(stack: ExitStack, pf: int) -> int:
    """Load the package's bpf/floor.c and attach it next to the flow program; returns its program fd."""
    from bcc import BPF

    bpf = BPF(src_file=str(probe.FLOOR_SOURCE).encode())
    stack.callback(bpf.cleanup)
    fd = int(
        bpf.load_func(b"kzt_floor", netfilter.BPF_PROG_TYPE_NETFILTER, attach_type=netfilter.BPF_NETFILTER).fd
    )
    with netns.entered(NODE):
        link = netfilter.link_create_netfilter(fd, pf, LINK_PRIORITY - 1)
    stack.callback(os.close, link)
    stack.callback(bpfsys.link_detach, link)
    return fd


def stats(fd: int) -> tuple[int, int]:
    info = bpfsys.prog_info(fd)
    return info.run_time_ns, info.run_cnt


def measure(fds: dict[str, int], shape: str, args: list[str]) -> dict[str, float]:
    before = {name: stats(fd) for name, fd in fds.items()}
    out = netns.run_in(POD, [sys.executable, TRAFFIC, "udp-stream", *args], timeout=600).stdout
    result = {}
    for name, fd in fds.items():
        ns, cnt = (a - b for a, b in zip(stats(fd), before[name], strict=True))
        result[name] = ns / max(cnt, 1)
        result[f"{name}_runs"] = cnt
    print(
        f"{shape:6s} floor {result['floor']:7.1f} ns/pkt  flow {result['flow']:7.1f} ns/pkt  "
        f"ratio {result['flow'] / result['floor']:.2f}x  (runs {result['flow_runs']}, {out.strip()})"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--churn-flows", type=int, default=5000)
    parser.add_argument("--ipv6", action="store_true", help="IPv6 traffic (36-byte keys) instead of IPv4")
    args = parser.parse_args()
    old_stats = STATS_SYSCTL.read_text().strip()
    with ExitStack() as stack:
        topo = stack.enter_context(netns.Topology())
        build(topo)
        dp = Datapath(DatapathConfig(node_name="kdb-bench", pin=False))
        with netns.entered(NODE):
            dp.start()
        stack.callback(dp.close)
        pf = netfilter.NFPROTO_IPV6 if args.ipv6 else netfilter.NFPROTO_IPV4
        link = next(fd for fd in dp.link_fds if bpfsys.link_info(fd).pf == pf)
        flow_fd = bpfsys.prog_fd_by_id(bpfsys.link_info(link).prog_id)
        stack.callback(os.close, flow_fd)
        fds = {"floor": attach_floor(stack, pf), "flow": flow_fd}
        sink = "fd78:2::2" if args.ipv6 else "10.78.2.2"
        STATS_SYSCTL.write_text("1")
        stack.callback(STATS_SYSCTL.write_text, old_stats)
        seconds = str(args.seconds)
        bulk = measure(fds, "bulk", [sink, "2000", seconds, "1000", "4"])
        churn = measure(fds, "churn", [sink, "2000", seconds, "64", str(args.churn_flows)])
        flows = len(dp.snapshot().flows)
    print(
        f"targets: bulk <= 1.5x (got {bulk['flow'] / bulk['floor']:.2f}x), "
        f"churn <= 3x (got {churn['flow'] / churn['floor']:.2f}x); flows in map after churn: {flows}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
