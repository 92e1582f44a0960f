"""Benchmark: resident memory of the datapath alone, idle and around one snapshot of many real flows.

    sudo .venv/bin/python bench/datapath_memory.py [--flows 100000] [--map-size 262144]

In a network namespace of its own (`kdm-bench`, peer `kdm-peer`), a fresh process starts the real datapath
(not pinned), sends one UDP datagram per flow to a peer that drops them, then takes two snapshots. Prints
RSS after start (idle), the peak during the snapshots and what it left resident, and whether libbcc was
ever mapped into the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NS, PEER = "kdm-bench", "kdm-peer"
DROP_UDP = "table inet kdmdrop { chain input { type filter hook input priority 0; meta l4proto udp drop; }; }"


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def inner(flows: int, map_size: int) -> dict[str, object]:
    from otel_kzt.agent.datapath import Datapath, DatapathConfig

    before_start = rss_mb()
    dp = Datapath(DatapathConfig("kdm-bench", pin=False, map_size=map_size))
    dp.start()
    try:
        idle = rss_mb()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(flows):  # one flow each: listening ports below the ephemeral range
                sock.sendto(b"m" * 32, (f"10.91.0.{2 + i % 8}", 9000 + i // 8))
        time.sleep(0.3)
        before_snapshot = rss_mb()
        started = time.process_time()
        counted = len(dp.snapshot().flows)
        counted = len(dp.snapshot().flows)
        cpu = (time.process_time() - started) / 2
        return {
            "rss_before_start_mb": round(before_start, 1),
            "rss_idle_mb": round(idle, 1),
            "rss_before_snapshot_mb": round(before_snapshot, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_snapshot_mb": round(rss_mb(), 1),
            "snapshot_cpu_s": round(cpu, 3),
            "flows_counted": counted,
            "libbcc_mapped": "libbcc" in Path("/proc/self/maps").read_text() or "bcc" in sys.modules,
        }
    finally:
        dp.close()


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--map-size", type=int, default=1 << 18)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(args.flows, args.map_size)))
        return 0
    from otel_kzt import netns

    with netns.Topology() as topo:
        topo.netns(NS)
        topo.netns(PEER)
        peers = [f"10.91.0.{i}/24" for i in range(2, 10)]
        topo.veth(NS, "kdm0", PEER, "eth0", a_addrs=["10.91.0.1/24"], b_addrs=peers)
        netns.ip(NS, "link", "set", "lo", "up")
        netns.run_in(PEER, ["nft", "-f", "-"], input=DROP_UDP)
        argv = [sys.executable, __file__, "--inner", "--flows", str(args.flows)]
        argv += ["--map-size", str(args.map_size)]
        out = netns.run_in(NS, argv, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for name, value in result.items():
        print(f"{name:24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
