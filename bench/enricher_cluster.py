"""Cluster scale: the real `otel-kzt enricher` process, default configuration, re-exporting to a real gRPC
downstream, fed by many agents through concurrent senders (DESIGN §5.9, issue 11's scale target).

Agents are 1,000 requests per interval (100 flows x bytes and packets each), sent by 8 threads, 4 intervals;
a refusal with a retry delay (back-pressure) is retried after it, as agents do. Printed: points received,
forwarded (counted by the downstream process), dropped (the enricher's own counter), refusals, the enricher
process's CPU seconds and peak RSS, points per CPU-second, and its CPU by thread (named for their roles:
`kzt-otlp-grpc_N` the receiver's workers, which decode and run the core; `kzt-export-*` the exporter's
consumers; `Thread-N (_serve)` grpcio's server poller; `event_engine` grpcio's C threads) for the first
interval (every series new) and the later ones. Targets: nothing dropped, >= 200k points per CPU-second,
<= 1 GiB RSS.

    .venv/bin/python bench/enricher_cluster.py [--agents 1000] [--flows 100] [--senders 8] [--intervals 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from bench.payloads import build_payloads, cluster_objects
from otel_kzt.otlp_failures import rpc_error_parts
from tests.support.k8s_objects import as_list

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PODS_PER_NODE = 30
HERE = Path(__file__).resolve().parent


@dataclass
class Result:
    received: int = 0
    forwarded: int = 0
    dropped: int = 0
    refusals: int = 0
    cpu_s: float = 0.0
    rss_peak: int = 0
    wall_s: float = 0.0
    interval_cpu_s: list[float] = field(default_factory=list)
    requests_forwarded: int = 0  # downstream requests: the exporter's batching
    roles_cpu_s: list[Counter[str]] = field(default_factory=list)  # per interval, by thread name

    @property
    def per_cpu_s(self) -> float:
        return self.received / max(self.cpu_s, 1e-9)

    @property
    def steady_per_cpu_s(self) -> float:
        """After the first interval: every series seen before (its naming cached), as in a running cluster."""
        later = self.interval_cpu_s[1:]
        return self.received * len(later) / len(self.interval_cpu_s) / max(sum(later), 1e-9)


def metadata(path: Path, agents: int) -> list[list[str]]:
    """The cluster of bench/payloads.py as the List file the enricher reads; its pod IPs per node."""
    nodes, pods, ips = cluster_objects(agents, PODS_PER_NODE)
    path.write_text(json.dumps(as_list(nodes + pods)))
    return ips


def intervals(first: list[bytes], count: int) -> list[list[bytes]]:
    """Interval k: every value times k+1, measured one second later (build the attributes once)."""
    out = [first]
    for k in range(1, count):
        row = []
        for raw in first:
            req = ExportMetricsServiceRequest.FromString(raw)
            for m in req.resource_metrics[0].scope_metrics[0].metrics:
                for dp in m.sum.data_points:
                    dp.as_int *= k + 1
                    dp.time_unix_nano = 10**9 * (k + 1)
            row.append(req.SerializeToString())
        out.append(row)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def thread_cpu_s(pid: int) -> Counter[str]:
    """CPU seconds of the process' threads by name (digits folded: a pool's workers are one role), in
    nanoseconds (schedstat): /proc/PID/stat counts clock ticks (10 ms), too coarse for an interval of
    ~0.1 s (the default configuration's). The enricher's threads live as long as it does (pools), so the
    sum over live threads is the process' CPU (within 1% of the ticks over a whole run)."""
    out: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            name = re.sub(r"\d+", "N", (task / "comm").read_text().strip())
            out[name] += int((task / "schedstat").read_text().split()[0]) / 1e9
    return out


def proc_cpu_s(pid: int) -> float:
    """The process' CPU seconds: its threads' (schedstat), or without schedstat the ticks."""
    try:
        return sum(thread_cpu_s(pid).values())
    except (FileNotFoundError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


def send_all(port: int, rows: list[list[bytes]], senders: int) -> int:
    """Each sender owns every `senders`-th agent and sends its intervals in order; returns refusals."""
    refusals = [0] * senders

    def run(s: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(EXPORT)
            for row in rows:
                for payload in row[s::senders]:
                    while True:
                        try:
                            call(payload, timeout=60)
                            break
                        except grpc.RpcError as exc:
                            _code, _, delay = rpc_error_parts(exc)
                            if delay is None:
                                raise
                            refusals[s] += 1
                            time.sleep(delay)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(refusals)


def wait_idle(pid: int, quiet_s: float = 1.0) -> None:
    """Until the enricher used no CPU for `quiet_s` (its exporters drained)."""
    last = proc_cpu_s(pid)
    while True:
        time.sleep(quiet_s)
        now = proc_cpu_s(pid)
        if now - last < 0.02:
            return
        last = now


def run(agents: int, flows: int, senders: int, count: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="kzt-bench-") as tmp:
        ips = metadata(Path(tmp) / "cluster.json", agents)
        rows = intervals(build_payloads(ips, flows, 1)[0], count)
        sink = subprocess.Popen(
            [sys.executable, str(HERE / "otlp_sink.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout is not None and sink.stdin is not None
        sink_port = int(sink.stdout.readline())
        grpc_port, metrics_port = free_port(), free_port()
        enricher = enricher_process(
            Path(tmp) / "cluster.json",
            "--cluster-cidr", "10.0.0.0/8",
            "--grpc-endpoint", f"127.0.0.1:{grpc_port}", "--http-endpoint", "",
            "--metrics-endpoint", f"127.0.0.1:{metrics_port}",
            "--export-endpoint", f"127.0.0.1:{sink_port}",
        )  # fmt: skip
        try:
            wait_ready(metrics_port)
            result = Result(received=agents * flows * 2 * count)
            t0 = time.monotonic()
            for row in rows:  # interval by interval, each until the enricher is idle again (exported)
                roles0 = thread_cpu_s(enricher.pid)
                result.refusals += send_all(grpc_port, [row], senders)
                wait_idle(enricher.pid)
                roles = thread_cpu_s(enricher.pid)
                roles.subtract(roles0)
                result.roles_cpu_s.append(roles)
                result.interval_cpu_s.append(sum(roles.values()))
            result.cpu_s, result.wall_s = sum(result.interval_cpu_s), time.monotonic() - t0
            result.rss_peak = proc_hwm(enricher.pid)
            result.dropped = int(scrape(metrics_port, "kzt_enricher_export_dropped_items_total"))
        finally:
            enricher.send_signal(signal.SIGTERM)
            enricher.wait(30)
            sink.stdin.close()
            counts = json.loads(sink.stdout.readline())
            sink.wait(10)
        result.forwarded, result.requests_forwarded = int(counts["points"]), int(counts["requests"])
        return result


def enricher_process(metadata_file: Path, *args: str) -> subprocess.Popen[bytes]:
    """`otel-kzt enricher` as its own process (its CPU and RSS are its own), its threads named for their
    roles (bench/named_threads.py); the JSON flow logs of the default configuration are written, not kept."""
    argv = [sys.executable, str(HERE / "named_threads.py"), "enricher", "--kube-metadata", str(metadata_file)]
    argv.extend(args)
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL)


def wait_ready(port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the enricher never became ready")


def report(r: Result, agents: int, flows: int, senders: int, count: int) -> None:
    print(
        f"cluster scale: {agents} agents x {flows} flows x 2 metrics, {senders} senders, {count} intervals "
        f"(enricher process, default configuration, gRPC in and out)"
    )
    print(f"  points received      {r.received:>12,}")
    print(f"  points forwarded     {r.forwarded:>12,}   target: all ({r.forwarded / r.received:.1%})")
    print(f"  in requests          {r.requests_forwarded:>12,}   (the exporter's batches)")
    print(f"  export dropped       {r.dropped:>12,}   target: 0")
    print(f"  retry-later answers  {r.refusals:>12,}   (back-pressure; the senders retried)")
    per_interval = ", ".join(f"{c:.2f}" for c in r.interval_cpu_s)
    print(
        f"  enricher CPU         {r.cpu_s:>12.2f} s  per interval: {per_interval} s (wall {r.wall_s:.1f} s)"
    )
    print(f"  points per CPU-s     {r.per_cpu_s:>12,.0f}   target: >= 200,000 ({r.per_cpu_s / 200_000:.2f}x)")
    steady = r.steady_per_cpu_s
    print(f"    after interval 1   {steady:>12,.0f}   (series known: {steady / 200_000:.2f}x the target)")
    print(f"  enricher peak RSS    {r.rss_peak / 2**20:>12,.0f} MiB target: <= 1024 MiB")
    for label, part in (("interval 1", r.roles_cpu_s[:1]), ("later, each", r.roles_cpu_s[1:])):
        print(f"  CPU by thread, {label:11s} {roles_line(part)}")


def roles_line(intervals: list[Counter[str]], top: int = 6) -> str:
    """The threads that used the most CPU, mean seconds per interval (what dominates, named)."""
    total: Counter[str] = Counter()
    for roles in intervals:
        total.update(roles)
    ranked = [
        (name, cpu / max(len(intervals), 1))
        for name, cpu in total.most_common(top)
        if cpu >= 0.005 * len(intervals)
    ]
    return ", ".join(f"{name} {cpu:.2f}s" for name, cpu in ranked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--intervals", type=int, default=4)
    args = parser.parse_args()
    result = run(args.agents, args.flows, args.senders, args.intervals)
    report(result, args.agents, args.flows, args.senders, args.intervals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
