"""Cluster scale: the real `otel-kzt enricher` process, default configuration, re-exporting to a real gRPC
downstream, fed by many agents through concurrent senders (DESIGN §5.9, issue 11's scale target).

Agents are 1,000 requests per interval (100 flows x bytes and packets each), sent by 8 threads, 4 intervals;
a refusal with a retry delay (back-pressure) is retried after it, as agents do. Printed: points received,
forwarded (counted by the downstream process), dropped (the enricher's own counter), refusals, the enricher
process's CPU seconds and peak RSS, points per CPU-second, and its CPU by thread (named for their roles:
`kzt-otlp-grpc_N` the receiver's workers, which decode and run the core; `kzt-export-*` the exporter's
consumers; `Thread-N (_serve)` grpcio's server poller; `event_engine` grpcio's C threads) for the first
interval (every series new) and the later ones, with the later intervals' minor page faults and context
switches by thread (counts: they hold on a loaded machine, where CPU seconds swing), and the part of it
the cyclic garbage collector took (gc.callbacks in the process, bench/named_threads.py), by generation.
Targets: nothing dropped, >= 200k points per CPU-second, <= 1 GiB RSS.

    .venv/bin/python bench/enricher_cluster.py [--agents 1000] [--flows 100] [--senders 8] [--intervals 4]
        [--enricher-arg=--grpc-workers=2 ...]
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
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from bench.payloads import build_payloads, cluster_objects
from otel_kzt import schema
from otel_kzt.errors import RetryableExportError
from otel_kzt.otlp_failures import classify, rpc_error_parts
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
    sent: list[Sent] = field(default_factory=list)  # per sender, all intervals
    enricher: dict[str, float] = field(default_factory=dict)  # its own counters after the last interval
    downstream: list[tuple[str, int]] = field(default_factory=list)  # the sink's count: when, points
    cpu_s: float = 0.0
    rss_peak: int = 0
    wall_s: float = 0.0
    interval_cpu_s: list[float] = field(default_factory=list)
    requests_forwarded: int = 0  # downstream requests: the exporter's batching
    roles_cpu_s: list[Counter[str]] = field(default_factory=list)  # per interval, by thread name
    # per interval, by thread name: minor page faults and context switches (voluntary + not), which hold
    # on a loaded machine where CPU seconds do not
    roles_faults: list[Counter[str]] = field(default_factory=list)
    roles_switches: list[Counter[str]] = field(default_factory=list)
    gc_s: list[GcShare] = field(default_factory=list)  # per interval: the collector's part of the CPU

    @property
    def accepted(self) -> int:
        """Points the enricher answered OK for (less partial rejections): what must reach downstream."""
        return sum(one.points_ok for one in self.sent)

    @property
    def lost(self) -> int:
        """Accepted and not forwarded (with 0 dropped counted, a loss nobody counted)."""
        return self.accepted - self.forwarded - self.dropped

    @property
    def per_cpu_s(self) -> float:
        return self.received / max(self.cpu_s, 1e-9)

    @property
    def steady_per_cpu_s(self) -> float:
        """After the first interval: every series seen before (its naming cached), as in a running cluster."""
        later = self.interval_cpu_s[1:]
        return self.received * len(later) / len(self.interval_cpu_s) / max(sum(later), 1e-9)


@dataclass(frozen=True)
class GcShare:
    """The cyclic collector's CPU seconds and collections per generation over one interval."""

    seconds: tuple[float, ...] = (0.0, 0.0, 0.0)
    collections: tuple[int, ...] = (0, 0, 0)

    @classmethod
    def read(cls, path: Path) -> GcShare:
        """The process' totals so far (bench/named_threads.py rewrites the file after each collection)."""
        try:
            got = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # none yet, or read while being rewritten
            return cls()
        return cls(tuple(got["seconds"]), tuple(got["collections"]))

    def since(self, before: GcShare) -> GcShare:
        return GcShare(
            tuple(a - b for a, b in zip(self.seconds, before.seconds, strict=True)),
            tuple(a - b for a, b in zip(self.collections, before.collections, strict=True)),
        )


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


def thread_events(pid: int) -> tuple[Counter[str], Counter[str]]:
    """Minor page faults (/proc/PID/task/TID/stat) and context switches (status: voluntary and not) of the
    process' threads by name, digits folded as in `thread_cpu_s`."""
    faults: Counter[str] = Counter()
    switches: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            name = re.sub(r"\d+", "N", (task / "comm").read_text().strip())
            faults[name] += int((task / "stat").read_text().rsplit(")", 1)[1].split()[7])
            status = (task / "status").read_text().splitlines()
            switches[name] += sum(int(ln.split()[1]) for ln in status if "ctxt_switches:" in ln)
    return faults, switches


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
    return scrape_all(port, (name,))[name]


def scrape_all(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Each name's samples summed over their labels, from the enricher's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return {name: sum(float(ln.split()[-1]) for ln in lines if ln.startswith(name)) for name in names}


ENRICHER_COUNTERS: Final = tuple(
    f"{name}_total"
    for name in (
        schema.ENRICHER_RECEIVED_POINTS,
        schema.ENRICHER_REJECTED_POINTS,
        schema.ENRICHER_RECEIVER_REFUSED,
        schema.ENRICHER_EXPORT_FAILURES,
        schema.ENRICHER_EXPORT_DROPPED,
    )
)


class Sink:
    """bench/otlp_sink.py in its own process: its port, and its counts now or after it stopped."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "otlp_sink.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.port = int(self.stdout.readline())

    def counts(self) -> dict[str, int]:
        self.stdin.write("\n")
        self.stdin.flush()
        return dict(json.loads(self.stdout.readline()))

    def stop(self) -> dict[str, int]:
        self.stdin.close()
        counts = dict(json.loads(self.stdout.readline()))
        self.proc.wait(10)
        return counts

    def wait_for(self, points: int, quiet_s: float = 5.0) -> int:
        """Until the sink holds `points`, or its count stood still for `quiet_s` (the exporter idle)."""
        last, since = -1, time.monotonic()
        while True:
            now = self.counts()["points"]
            if now >= points or time.monotonic() - since > quiet_s:
                return now
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.2)


@dataclass
class Sent:
    """What one sender's requests became, so every point's fate is printed: answered OK (its points
    accepted, less any partial rejection), or given up (`failed`, with the reason in `errors`). Retries
    are counted apart: `refused` after a retry-later answer (its delay), `retried` after a transient
    failure with no delay (backoff), both as agents do (otel_kzt/otlp_failures.py decides which)."""

    requests: int = 0  # attempts, retries included
    ok: int = 0
    refused: int = 0
    retried: int = 0
    failed: int = 0
    points_ok: int = 0
    points_rejected: int = 0  # partial success: the enricher answered OK but rejected these
    points_failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, other: Sent) -> None:
        for name in ("requests", "ok", "refused", "retried", "failed", "points_ok", "points_rejected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.points_failed += other.points_failed
        self.errors.update(other.errors)


def points_in(payload: bytes) -> int:
    req = ExportMetricsServiceRequest.FromString(payload)
    return sum(
        len(m.sum.data_points) for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    )


def send_all(port: int, rows: list[list[bytes]], senders: int, attempts: int = 8) -> list[Sent]:
    """Each sender owns every `senders`-th agent and sends its intervals in order; what each request
    became, per sender. A request is given up after `attempts` transient failures or a permanent one,
    and a sender that fails otherwise gives up the rest of its share: both counted, never silent."""
    sent = [Sent() for _ in range(senders)]

    def send(call: grpc.UnaryUnaryMultiCallable, payload: bytes, mine: Sent) -> None:
        points, backoff = points_in(payload), 0.2
        for _attempt in range(attempts):
            mine.requests += 1
            try:
                raw = call(payload, timeout=60)
            except grpc.RpcError as exc:
                code, details, delay = rpc_error_parts(exc)
                if not isinstance(classify(code, details, delay), RetryableExportError):
                    mine.errors[f"{code and code.name}: {details}"] += 1
                    break
                mine.errors[f"{code and code.name}: {details} (retried)"] += 1
                if delay is not None:
                    mine.refused += 1
                else:
                    mine.retried += 1
                    delay, backoff = backoff, min(backoff * 2, 5.0)
                time.sleep(delay)
                continue
            rejected = ExportMetricsServiceResponse.FromString(raw).partial_success.rejected_data_points
            mine.ok += 1
            mine.points_ok += points - rejected
            mine.points_rejected += rejected
            return
        mine.failed += 1
        mine.points_failed += points

    def run(s: int) -> None:
        mine = sent[s]
        share = [payload for row in rows for payload in row[s::senders]]
        done = 0
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(EXPORT)
                for payload in share:
                    send(call, payload, mine)
                    done += 1
        except Exception as exc:  # the rest of this sender's share is given up: counted, never lost
            mine.errors[f"sender stopped: {exc!r}"] += 1
            for payload in share[done:]:
                mine.failed += 1
                mine.points_failed += points_in(payload)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent


def wait_idle(pid: int, quiet_s: float = 1.0) -> None:
    """Until the enricher used no CPU for `quiet_s` (its exporters drained)."""
    last = proc_cpu_s(pid)
    while True:
        time.sleep(quiet_s)
        now = proc_cpu_s(pid)
        if now - last < 0.02:
            return
        last = now


def run(agents: int, flows: int, senders: int, count: int, extra: tuple[str, ...] = ()) -> Result:
    with tempfile.TemporaryDirectory(prefix="kzt-bench-") as tmp:
        ips = metadata(Path(tmp) / "cluster.json", agents)
        rows = intervals(build_payloads(ips, flows, 1)[0], count)
        sink = Sink()
        grpc_port, metrics_port = free_port(), free_port()
        gc_file = Path(tmp) / "gc.json"
        enricher = enricher_process(
            Path(tmp) / "cluster.json",
            "--cluster-cidr", "10.0.0.0/8",
            "--grpc-endpoint", f"127.0.0.1:{grpc_port}", "--http-endpoint", "",
            "--metrics-endpoint", f"127.0.0.1:{metrics_port}",
            "--export-endpoint", f"127.0.0.1:{sink.port}",
            *extra,
            gc_file=gc_file,
        )  # fmt: skip
        try:
            wait_ready(metrics_port)
            result = Result(received=agents * flows * 2 * count, sent=[Sent() for _ in range(senders)])
            t0 = time.monotonic()
            for row in rows:  # interval by interval, each until the enricher is idle again (exported)
                roles0, gc0 = thread_cpu_s(enricher.pid), GcShare.read(gc_file)
                faults0, switches0 = thread_events(enricher.pid)
                for total, one in zip(result.sent, send_all(grpc_port, [row], senders), strict=True):
                    total.add(one)
                wait_idle(enricher.pid)
                roles = thread_cpu_s(enricher.pid)
                roles.subtract(roles0)
                faults, switches = thread_events(enricher.pid)
                faults.subtract(faults0)
                switches.subtract(switches0)
                result.roles_faults.append(faults)
                result.roles_switches.append(switches)
                result.roles_cpu_s.append(roles)
                result.interval_cpu_s.append(sum(roles.values()))
                result.gc_s.append(GcShare.read(gc_file).since(gc0))
            result.cpu_s, result.wall_s = sum(result.interval_cpu_s), time.monotonic() - t0
            result.refusals = sum(one.refused for one in result.sent)
            result.rss_peak = proc_hwm(enricher.pid)
            result.downstream.append(("enricher idle", sink.counts()["points"]))
            result.enricher = scrape_all(metrics_port, ENRICHER_COUNTERS)
            result.dropped = int(result.enricher[f"{schema.ENRICHER_EXPORT_DROPPED}_total"])
            result.downstream.append(("after draining", sink.wait_for(result.accepted - result.dropped)))
        finally:
            enricher.send_signal(signal.SIGTERM)
            enricher.wait(30)
            counts = sink.stop()
        result.downstream.append(("enricher stopped", int(counts["points"])))
        result.forwarded, result.requests_forwarded = int(counts["points"]), int(counts["requests"])
        return result


def enricher_process(metadata_file: Path, *args: str, gc_file: Path | None = None) -> subprocess.Popen[bytes]:
    """`otel-kzt enricher` as its own process (its CPU and RSS are its own), its threads named for their
    roles and its collector's time kept in `gc_file` when given (bench/named_threads.py); the JSON flow
    logs of the default configuration are written, not kept."""
    argv = [sys.executable, str(HERE / "named_threads.py"), "enricher", "--kube-metadata", str(metadata_file)]
    argv.extend(args)
    env = dict(os.environ)
    if gc_file is not None:
        env["KZT_BENCH_GC_FILE"] = str(gc_file)
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)


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
    print(f"  points accepted      {r.accepted:>12,}   (answered OK, less partial rejections)")
    print(f"  accepted, not forwarded, not dropped {r.lost:,}   target: 0")
    print("  downstream points    " + ", ".join(f"{when} {n:,}" for when, n in r.downstream))
    print(
        "  enricher counters    "
        + ", ".join(f"{k.removeprefix('kzt_enricher_')} {v:,.0f}" for k, v in r.enricher.items())
    )
    for s, one in enumerate(r.sent):
        print(
            f"  sender {s}: requests {one.requests:,} ok {one.ok:,} refused {one.refused:,} retried "
            f"{one.retried:,} failed {one.failed:,}; points ok {one.points_ok:,} rejected "
            f"{one.points_rejected:,} failed {one.points_failed:,}"
        )
        for reason, n in one.errors.most_common():
            print(f"    {n:,} x {reason}")
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
    print(f"  minor faults by thread, later, each: {events_line(r.roles_faults[1:])}")
    print(f"  context switches by thread, later, each: {events_line(r.roles_switches[1:])}")
    for i, (share, cpu) in enumerate(zip(r.gc_s, r.interval_cpu_s, strict=True)):
        spent = sum(share.seconds)
        gens = ", ".join(
            f"gen{g} {n} x {sec:.2f}s"
            for g, (n, sec) in enumerate(zip(share.collections, share.seconds, strict=True))
        )
        print(
            f"  GC, interval {i + 1:<7d} {spent:>8.2f} s  ({spent / max(cpu, 1e-9):.0%} of its CPU): {gens}"
        )


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


def events_line(intervals: list[Counter[str]], top: int = 5, scale: float = 1.0) -> str:
    """The threads with the most events (faults, switches; CPU seconds x `scale`), mean per interval."""
    total: Counter[str] = Counter()
    for counts in intervals:
        total.update(counts)
    n = max(len(intervals), 1)
    ranked = [(name, count * scale / n) for name, count in total.most_common(top)]
    return ", ".join(
        f"{name} {mean:,.1f}" if scale != 1 else f"{name} {mean:,.0f}" for name, mean in ranked if mean >= 1
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--intervals", type=int, default=4)
    parser.add_argument(
        "--enricher-arg", action="append", default=[], metavar="ARG", help="passed to the enricher (repeat)"
    )
    args = parser.parse_args()
    result = run(args.agents, args.flows, args.senders, args.intervals, tuple(args.enricher_arg))
    report(result, args.agents, args.flows, args.senders, args.intervals)
    given_up = sum(one.points_failed for one in result.sent)
    if result.lost or given_up or result.accepted != result.received:
        print(f"FAILED: {given_up:,} points given up by the senders, {result.lost:,} accepted and lost")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
