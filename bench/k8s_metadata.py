"""Benchmark: Kubernetes metadata at cluster scale (issue 3).

    .venv/bin/python bench/k8s_metadata.py [--nodes 5000] [--pods 100000] [--burst 20000] [--rate 1000]

The test API server (tests/support) runs in a child process with realistic Node and Pod objects (built from
tests/fixtures/k8s: containers, managed fields, owner references; 10% dual-stack pods, some host-network
DaemonSet pods). This process runs the real API source (kubernetes client, raw JSON, pages of 500) into a
ClusterIndex, so the RSS and CPU printed are the client's own. Phases:

1. initial sync: list every node and pod, time until `ready()`;
2. lookups: every pod IP, every node IP and unknown addresses, with and without a timestamp;
3. burst: `--burst` watch events queued at once (pod deleted + recreated on the same IP, status-only
   updates): events applied per second;
4. paced: `--rate` events/s for `--seconds`: the client's CPU share and how far it lags behind;
5. correctness: a reused IP names the new pod now, and the old pod before the reuse;
6. the file source: the same cluster as one kubectl JSON List, loaded in a process of its own.

Targets (issue 3): sync <= 10 s, >= 5,000 events/s, <= 300 MB RSS, <= 2 us per lookup.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from otel_kzt.k8s import MetadataHandle  # noqa: E402
from otel_kzt.k8s.apisource import ApiSource, WatchConfig, api_sources  # noqa: E402
from otel_kzt.k8s.index import ClusterIndex  # noqa: E402
from otel_kzt.k8s.kubeclient import load_api_client  # noqa: E402

ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
OWNERS = (("ReplicaSet", "checkout-6d5f9c7b8d"), ("StatefulSet", "postgres"), ("Job", "report-29391840"),
          ("ReplicaSet", "frontend-7c9d8f6b5"), ("DaemonSet", "log-agent"))


def pod_ip(i: int) -> str:
    return f"10.{16 + i // 65536}.{i // 256 % 256}.{i % 256}"


def node_ip(n: int) -> str:
    return f"172.16.{n // 256}.{n % 256}"


def pod_object(i: int, n_nodes: int, generation: int = 0) -> dict[str, Any]:
    from tests.support.k8s_objects import make_pod

    kind, owner = OWNERS[i % len(OWNERS)]
    ips = [pod_ip(i)] + ([f"fd00:10::{i:x}"] if i % 10 == 0 else [])
    template_hash = owner.rsplit("-", 1)[-1] if kind == "ReplicaSet" else None
    pod = make_pod(f"{owner}-{i}-g{generation}", f"node-{i % n_nodes}", ips, namespace=f"team-{i % 40}",
                   owner=(kind, owner), template_hash=template_hash)
    if kind == "DaemonSet" and i % 50 == 4:  # some host-network agents: their IP is the node's
        pod["spec"]["hostNetwork"] = True
        pod["status"]["podIP"] = node_ip(i % n_nodes)
        pod["status"]["podIPs"] = [{"ip": node_ip(i % n_nodes)}]
    return pod


def serve(conn: Connection, n_nodes: int, n_pods: int) -> None:
    """The child process: build the cluster into a FakeApiServer, then run churn commands."""
    from tests.support.k8s_apiserver import ENRICHER, FakeApiServer
    from tests.support.k8s_objects import make_node

    started = time.monotonic()
    with FakeApiServer(history_limit=500_000, bookmark_interval_s=1.0) as api:
        for n in range(n_nodes):
            zone = ZONES[n % 3]
            api.add(make_node(f"node-{n}", [node_ip(n)], zone=zone, provider_id=f"aws:///{zone}/i-{n}"))
        for i in range(n_pods):
            api.add(pod_object(i, n_nodes))
        conn.send((api.url, api.token(ENRICHER), time.monotonic() - started))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                return
            if command[0] == "dump":  # the same cluster as `kubectl get nodes,pods -A -o json` prints it
                items = [s.data for s in api.current("nodes")[1] + api.current("pods")[1]]
                Path(command[1]).write_bytes(b'{"apiVersion":"v1","items":[' + b",".join(items)
                                             + b'],"kind":"List","metadata":{"resourceVersion":""}}')
                conn.send(len(items))
                continue
            name, count, rate = command
            if name == "backlog":
                api.refuse_watches = True
                api.drop_connections()
            try:
                conn.send(churn(api, count, rate, n_nodes, n_pods))
            finally:
                api.refuse_watches = False


def churn(api: Any, count: int, rate: float | None, n_nodes: int, n_pods: int) -> tuple[int, float, float]:
    """`count` events: per pod, delete + recreate on the same IP (a reuse), then a status-only update."""
    batch = []
    for k in range(count // 3):
        i = (k * 7919) % n_pods
        old = pod_object(i, n_nodes, generation=churn.generation)  # type: ignore[attr-defined]
        new = pod_object(i, n_nodes, generation=churn.generation + 1)  # type: ignore[attr-defined]
        batch.append((old["metadata"]["name"], new))
    churn.generation += 1  # type: ignore[attr-defined]
    first = time.time()
    produced = 0
    for name, new in batch:
        api.delete("Pod", name, new["metadata"]["namespace"])
        api.add(new)
        new["status"]["conditions"][0]["lastProbeTime"] = "2026-11-22T21:00:00Z"
        api.update(new)
        produced += 3
        if rate:
            time.sleep(max(0.0, first + produced / rate - time.time()))
    return produced, first, time.time()


churn.generation = 0  # type: ignore[attr-defined]


def rss_mb() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_events(source: ApiSource, target: int, timeout_s: float = 120) -> float:
    deadline = time.monotonic() + timeout_s
    while source.events < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {source.events} of {target} events applied")
        time.sleep(0.0005)
    return time.time()


def time_lookups(index: ClusterIndex, addresses: list[str], at: float | None) -> float:
    lookup = index.lookup
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for address in addresses:
            lookup(address, at)
        best = min(best, time.perf_counter() - started)
    return best / len(addresses) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--pods", type=int, default=100_000)
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child, args.nodes, args.pods), daemon=True)
    server.start()
    try:
        return run(args, parent)
    finally:
        parent.send(("stop",))
        server.join(30)
        if server.is_alive():
            server.terminate()


def run(args: argparse.Namespace, conn: Connection) -> int:
    import tempfile

    url, token, build_s = conn.recv()  # the enricher's own ServiceAccount token: the shipped RBAC applies
    print(f"server: {args.nodes} nodes + {args.pods} pods built in {build_s:.1f}s at {url}")
    kubeconfig = Path(tempfile.mkdtemp()) / "kubeconfig"
    kubeconfig.write_text(
        f"apiVersion: v1\nkind: Config\nclusters: [{{name: b, cluster: {{server: '{url}'}}}}]\n"
        f"users: [{{name: u, user: {{token: '{token}'}}}}]\n"
        "contexts: [{name: b, context: {cluster: b, user: u}}]\ncurrent-context: b\n"
    )
    rss_before, _ = rss_mb()
    client, _ = load_api_client(str(kubeconfig))
    index = ClusterIndex()
    sources = api_sources(client, index, config=WatchConfig(page_size=500))
    pods = next(s for s in sources if s.name == "api-pods")
    handle = MetadataHandle(index, list(sources), "bench", client.close)
    results: dict[str, float] = {}
    started = time.monotonic()
    handle.start()
    try:
        if not handle.wait_ready(300):
            raise TimeoutError("initial sync did not finish")
        results["sync_s"] = time.monotonic() - started
        results["rss_sync_mb"] = rss_mb()[0]
        print(f"initial sync: {results['sync_s']:.2f} s  pods={index.pod_count} nodes={index.node_count}"
              f"  RSS {rss_before:.0f} MB before -> {results['rss_sync_mb']:.0f} MB")

        addresses = [pod_ip(i) for i in range(args.pods)] + [node_ip(n) for n in range(args.nodes)]
        addresses += [f"203.0.{i // 256 % 256}.{i % 256}" for i in range(10_000)]
        results["lookup_us"] = time_lookups(index, addresses, None)
        results["lookup_at_us"] = time_lookups(index, addresses, time.time() - 1)
        print(f"lookup: {results['lookup_us']:.3f} us/IP (now), {results['lookup_at_us']:.3f} us/IP "
              f"(with timestamp), over {len(addresses)} addresses")

        # The burst is produced while the client is cut off (an API server restart), then streamed to it at
        # once when it resumes from its version: the rate is the client's, not the producer's.
        before = pods.events
        conn.send(("backlog", args.burst, None))
        produced, _, _ = conn.recv()
        first = wait_events(pods, before + 1)
        done = wait_events(pods, before + produced)
        results["events_per_s"] = (produced - 1) / (done - first)
        print(f"burst: {produced} queued events applied in {done - first:.2f} s = "
              f"{results['events_per_s']:.0f} events/s")

        before, cpu0, wall0 = pods.events, cpu_s(), time.monotonic()
        reuse_at = time.time()
        conn.send(("churn", int(args.rate * args.seconds), args.rate))
        produced, first, last = conn.recv()
        done = wait_events(pods, before + produced)
        cpu_share = (cpu_s() - cpu0) / (time.monotonic() - wall0)
        results["paced_lag_s"] = done - last
        print(f"paced: {produced} events at {produced / (last - first):.0f}/s; client CPU "
              f"{cpu_share * 100:.1f}% of one core; the last one applied "
              f"{results['paced_lag_s'] * 1000:.1f} ms after it was produced")

        reused = [pod_ip((k * 7919) % args.pods) for k in range(min(args.burst, args.pods) // 3)]
        results["lookup_reused_us"] = time_lookups(index, reused, reuse_at)
        print(f"lookup of reused IPs (history walk): {results['lookup_reused_us']:.3f} us/IP "
              f"over {len(reused)} addresses")

        rss, hwm = rss_mb()
        results["rss_mb"] = max(hwm, rss)
        print(f"RSS now {rss:.0f} MB, peak {hwm:.0f} MB")
        check_reuse(index, reuse_at)
    finally:
        handle.shutdown()
    file_phase(conn, results)
    return report(results)


def load_file(conn: Connection, path: str) -> None:
    """A separate process, so its RSS is the file source's own: load the List once, report."""
    from otel_kzt.k8s.filesource import FileSource

    before = rss_mb()[0]
    index = ClusterIndex()
    started = time.monotonic()
    FileSource(path, index).poll()
    elapsed = time.monotonic() - started
    rss, hwm = rss_mb()
    conn.send((elapsed, index.pod_count, before, rss, hwm))


def file_phase(conn: Connection, results: dict[str, float]) -> None:
    import tempfile

    path = str(Path(tempfile.mkdtemp()) / "cluster.json")
    conn.send(("dump", path))
    count = conn.recv()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    loader = ctx.Process(target=load_file, args=(child, path))
    loader.start()
    elapsed, pods, before, rss, hwm = parent.recv()
    loader.join()
    Path(path).unlink()
    results["file_load_s"] = elapsed
    print(f"file source: {count} objects ({pods} pods) as kubectl JSON loaded in {elapsed:.2f} s; RSS "
          f"{before:.0f} MB before -> {rss:.0f} MB after, peak {hwm:.0f} MB (file text included)")


def check_reuse(index: ClusterIndex, before_reuse: float) -> None:
    """The first pod churned in the paced phase was recreated on its IP: both sides must be named."""
    now_name = index.lookup(pod_ip(0))
    old_name = index.lookup(pod_ip(0), before_reuse)
    assert now_name is not None and old_name is not None, "reused IP not named"
    assert now_name.pod_uid != old_name.pod_uid, (now_name, old_name)
    print(f"reuse: {pod_ip(0)} was {old_name.pod_name} before the reuse, is {now_name.pod_name} now")


def report(results: dict[str, float]) -> int:
    targets = [("sync_s", 10.0, "<="), ("events_per_s", 5000.0, ">="), ("rss_mb", 300.0, "<="),
               ("lookup_us", 2.0, "<="), ("lookup_at_us", 2.0, "<="), ("lookup_reused_us", 2.0, "<=")]
    failed = 0
    for key, limit, op in targets:
        ok = results[key] <= limit if op == "<=" else results[key] >= limit
        failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {key} = {results[key]:.3f} (target {op} {limit:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
