"""Benchmark: one export interval of 100,000 active flows, agent fast path vs the OpenTelemetry SDK path.

    .venv/bin/python bench/agent.py [--flows 100000] [--kernel]

Each side runs in its own process (so CPU and peak RSS are its own) and exports over OTLP/gRPC to the same
receiver process on 127.0.0.1, which counts the data points it got and any `otel.metric.overflow` point:

- fast: otel_kzt.agent.service.AgentService on a fake flow map (the datapath's own read is not measured
  here), local-flow selection + naming from a metadata index, requests built on the wire, split by size;
- sdk:  ObservableCounter callbacks (bytes, packets) with pre-built attribute dicts, a
  PeriodicExportingMetricReader with the cardinality cap raised above the flow count, OTLPMetricExporter.

With --kernel (root), also the real path, the agent as it is deployed: the bcc datapath of a node
(network namespace) counting that many real UDP flows that 250 pods (addresses in a pods' namespace) send
through the node, as pod traffic is forwarded; the agent's metadata from an API server (the test API
server of tests/support, in a process of its own, as the agent's ServiceAccount: node-scoped list + watch
through the kubernetes client, as in the DaemonSet), so the flows are named by pod; the blind-datapath
check, the health endpoint serving and the agent's heap settings; its two intervals including the map
reads (the datapath's share of the work), half the flows sent to again between them. The target is
judged on this path too.

Interval 1 is cold (names and serialized attributes cached), interval 2 is the steady state (values changed).
Prints CPU seconds and peak RSS of both and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NODE = "bench-node"
OVERFLOW_ATTR = "otel.metric.overflow"


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flow_table(n: int) -> list[tuple[str, str, int, int]]:
    """(src pod IP, dst IP, dst port, pod number): 250 local pods talking to many destinations."""
    return [
        (f"10.0.1.{i % 250 + 1}", f"10.{64 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 80 + i % 7, i % 250)
        for i in range(n)
    ]


# --- receiver process ------------------------------------------------------------------------------------


def run_receiver(log_path: str) -> None:
    import grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

    from otel_kzt.schema import SOURCE_POD_NAME

    class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            points = overflow = named = 0
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if not m.name.startswith("kzt.flow") and m.name not in {"bytes", "packets"}:
                            continue
                        for p in m.sum.data_points:
                            points += 1
                            overflow += any(kv.key == OVERFLOW_ATTR for kv in p.attributes)
                            named += any(kv.key == SOURCE_POD_NAME for kv in p.attributes)
            with open(log_path, "a") as f:
                f.write(f"{points} {overflow} {request.ByteSize()} {named}\n")
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[("grpc.max_receive_message_length", 512 * 1024 * 1024)],
    )
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


# --- fast path ---------------------------------------------------------------------------------------------


def run_fast(port: int, n: int) -> dict[str, float]:
    import ipaddress

    from otel_kzt import gctune
    from otel_kzt.agent import heap
    from otel_kzt.agent.config import AgentConfig, OtlpConfig
    from otel_kzt.agent.export import Exporter
    from otel_kzt.agent.flows import AF_INET, FlowKey
    from otel_kzt.agent.local import LocalFlows
    from otel_kzt.agent.service import AgentService
    from otel_kzt.k8s.model import Endpoint
    from otel_kzt.schema import WorkloadKind
    from tests.unit.test_agent_support import FakeIndex, FakeMap

    heap.keep_big_blocks_mapped()  # as `otel-kzt agent` does
    gctune.space_collections()
    index = FakeIndex()
    for pod in range(250):
        index.endpoints[f"10.0.1.{pod + 1}"] = Endpoint(
            NODE,
            WorkloadKind.DEPLOYMENT,
            "web",
            pod_name=f"web-7f9c8d6b5-{pod:05d}",
            namespace="shop",
            pod_uid=f"3f1c2a9e-0000-4000-8000-{pod:012d}",
        )
    fake = FakeMap(capacity=2 * n)
    for src, dst, port_, _pod in flow_table(n):
        raw_src, raw_dst = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
        fake.add(FlowKey(AF_INET, raw_src, raw_dst, 6, 0, port_), 1500, 1)
    otlp = OtlpConfig(endpoints=(f"http://127.0.0.1:{port}",), timeout_s=30.0)
    config = AgentConfig(node_name=NODE, otlp=otlp)
    exporter = Exporter(otlp, NODE)
    local = LocalFlows(NODE, index, interface_addresses=frozenset)
    service = AgentService(config, fake, exporter, local, index, host_name=NODE)
    base_rss = peak_rss_mb()
    out: dict[str, float] = {"rss_after_map_mb": base_rss}
    for interval in (1, 2):
        for key in list(fake.flows)[: n // 2]:
            fake.add(key, 100, 1)
        started = cpu_s()
        result = service.export_once(time.monotonic() + 60, threading.Event())
        out[f"cpu_s_{interval}"] = cpu_s() - started
        out[f"requests_{interval}"] = result.sent
    exporter.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# --- SDK path ---------------------------------------------------------------------------------------------


def run_sdk(port: int, n: int) -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from otel_kzt import schema

    flows = []
    for src, dst, dport, pod in flow_table(n):
        attrs = {
            schema.SOURCE_ADDRESS: src,
            schema.DESTINATION_ADDRESS: dst,
            schema.NETWORK_TYPE: "ipv4",
            schema.NETWORK_TRANSPORT: "tcp",
            schema.DESTINATION_PORT: dport,
            schema.SOURCE_POD_NAME: f"web-7f9c8d6b5-{pod:05d}",
            schema.SOURCE_NAMESPACE_NAME: "shop",
            schema.SOURCE_POD_UID: f"3f1c2a9e-0000-4000-8000-{pod:012d}",
        }
        flows.append([attrs, 1500, 1])

    def observe_bytes(_options: CallbackOptions) -> list[Observation]:
        return [Observation(f[1], f[0]) for f in flows]

    def observe_packets(_options: CallbackOptions) -> list[Observation]:
        return [Observation(f[2], f[0]) for f in flows]

    exporter = OTLPMetricExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=60)
    reader = PeriodicExportingMetricReader(
        exporter, export_interval_millis=10**9, cardinality_limits={ObservableCounter: 2 * n + 10}
    )
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    meter = provider.get_meter("bench")
    meter.create_observable_counter(schema.FLOW_BYTES, [observe_bytes], unit="By")
    meter.create_observable_counter(schema.FLOW_PACKETS, [observe_packets], unit="{packet}")
    out: dict[str, float] = {"rss_after_map_mb": peak_rss_mb()}
    for interval in (1, 2):
        for f in flows[: n // 2]:
            f[1] += 100
            f[2] += 1
        started = cpu_s()
        provider.force_flush(timeout_millis=120_000)
        out[f"cpu_s_{interval}"] = cpu_s() - started
    # No provider.shutdown(): it would collect and export a third time.
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# --- the real datapath (--kernel, root) --------------------------------------------------------------------

KERNEL_NS, KERNEL_PEER, KERNEL_PODS = "ka-bench", "ka-benchp", "ka-benchpods"
PODS = 250
DROP_UDP = "table inet kadrop { chain input { type filter hook input priority 0; meta l4proto udp drop; }; }"


def pod_address(pod: int) -> str:
    return f"10.91.{pod // 250}.{pod % 250 + 1}"


def run_apiserver(kubeconfig: str, pods: int) -> None:
    """The node and its pods behind the test API server; writes the agent's kubeconfig, then serves."""
    from tests.support.k8s_apiserver import AGENT, FakeApiServer
    from tests.support.k8s_objects import make_node, make_pod

    with FakeApiServer() as api:
        api.add(make_node(KERNEL_NS, ["10.90.0.1"]))
        for pod in range(pods):
            api.add(make_pod(f"web-7f9c8d6b5-{pod:05d}", KERNEL_NS, [pod_address(pod)], namespace="shop"))
        api.write_kubeconfig(kubeconfig, AGENT)
        print("ready", flush=True)
        threading.Event().wait()


def run_kernel(port: int, n: int, kubeconfig: str) -> dict[str, float]:
    """Inside KERNEL_NS: the bcc datapath counts `n` real UDP flows, then two agent intervals on it,
    wired as `otel-kzt agent` wires them (agent/command.py)."""
    import urllib.request

    from otel_kzt import gctune
    from otel_kzt.agent import coverage, heap
    from otel_kzt.agent.config import AgentConfig, OtlpConfig
    from otel_kzt.agent.datapath import DatapathConfig, start_datapath
    from otel_kzt.agent.export import Exporter
    from otel_kzt.agent.healthport import HealthPort
    from otel_kzt.agent.local import LocalFlows
    from otel_kzt.agent.service import AgentService
    from otel_kzt.k8s import open_metadata

    heap.keep_big_blocks_mapped()  # as `otel-kzt agent` does
    gctune.space_collections()
    datapath = start_datapath(DatapathConfig(KERNEL_NS, pin=False, map_size=1 << 18), "netfilter")
    heap.release_freed()
    handle = open_metadata(None, node_name=KERNEL_NS, kubeconfig=kubeconfig)
    senders = pod_senders()
    try:
        handle.start()
        if not handle.wait_ready(30):
            raise RuntimeError(f"metadata not synced: {handle.status()}")
        send_flows(senders, range(n))
        otlp = OtlpConfig(endpoints=(f"http://127.0.0.1:{port}",), timeout_s=30.0)
        exporter = Exporter(otlp, KERNEL_NS)
        service = AgentService(
            AgentConfig(node_name=KERNEL_NS, otlp=otlp, kubeconfig=kubeconfig),
            datapath,
            exporter,
            LocalFlows(KERNEL_NS, handle.index),
            handle.index,
            host_name=KERNEL_NS,
            datapath=datapath.config.mode,
            coverage=coverage.for_datapath(datapath, handle.index, KERNEL_NS),
        )
        # The agent as it runs: its health endpoint (aiohttp, prometheus_client) serving the whole time.
        health = HealthPort("127.0.0.1", 0, service.health)
        health_port = health.start()
        out: dict[str, float] = {"rss_after_map_mb": peak_rss_mb()}
        for interval in (1, 2):
            started = cpu_s()
            service.export_once(time.monotonic() + 60, threading.Event())
            out[f"cpu_s_{interval}"] = cpu_s() - started
            out[f"rss_after_{interval}_mb"] = rss_mb()
            if interval == 1:
                send_flows(senders, range(0, n, 2))  # the steady state: half the flows' values changed
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=10) as resp:
            assert b"kzt_agent_flows_tracked" in resp.read()
        health.shutdown()
        exporter.close()
        out["peak_rss_mb"] = peak_rss_mb()
        return out
    finally:
        for sock in senders:
            sock.close()
        handle.shutdown()
        datapath.close()


def pod_senders() -> list[socket.socket]:
    """One UDP socket per pod, made in the pods' namespace, bound to the pod's address."""
    from otel_kzt import netns

    senders = []
    with netns.entered(KERNEL_PODS):
        for pod in range(PODS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            senders.append(sock)
            sock.bind((pod_address(pod), 0))
    return senders


def send_flows(senders: list[socket.socket], flows: range) -> None:
    """One datagram on each flow (pod, destination, port): listening-side ports above the overlay ports,
    below the ephemeral range."""
    for i in flows:
        senders[i % PODS].sendto(b"k" * 64, (f"10.90.0.{2 + i // PODS % 8}", 9000 + i // (8 * PODS)))


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def kernel_bed(n: int, tmp: Path) -> dict[str, float]:
    """A node netns whose forwarded pod traffic the real datapath counts; receiver, API server and agent
    run inside it."""
    from otel_kzt import netns

    log, kubeconfig = tmp / "kernel.log", tmp / "kubeconfig"
    with netns.Topology() as topo:
        for ns in (KERNEL_NS, KERNEL_PEER, KERNEL_PODS):
            topo.netns(ns)
        peers = [f"10.90.0.{i}/24" for i in range(2, 10)]
        topo.veth(KERNEL_NS, "kab0", KERNEL_PEER, "eth0", a_addrs=["10.90.0.1/24"], b_addrs=peers)
        pods = [f"{pod_address(pod)}/16" for pod in range(PODS)]
        topo.veth(KERNEL_NS, "kapods", KERNEL_PODS, "eth0", a_addrs=["10.91.255.254/16"], b_addrs=pods)
        topo.route(KERNEL_PODS, "default", via="10.91.255.254")
        netns.enable_forwarding(KERNEL_NS)
        netns.run_in(KERNEL_PEER, ["nft", "-f", "-"], input=DROP_UDP)
        children = {}
        for mode, extra in (("receiver", ["--log", str(log)]), ("apiserver", ["--log", str(kubeconfig)])):
            argv = [sys.executable, __file__, "--mode", mode, *extra]
            child = children[mode] = netns.popen_in(KERNEL_NS, argv, stdout=subprocess.PIPE)
            topo.on_close(mode, lambda child=child: (child.terminate(), child.wait()))
        port = int(children["receiver"].stdout.readline())  # type: ignore[union-attr]
        children["apiserver"].stdout.readline()  # type: ignore[union-attr]
        argv = [sys.executable, __file__, "--mode", "kernel", "--port", str(port), "--flows", str(n)]
        argv += ["--log", str(kubeconfig)]
        out = netns.run_in(KERNEL_NS, argv, timeout=600).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    result["points"], result["overflow_points"], result["requests"], result["pod_points"] = received(log)
    return result


# --- driver -----------------------------------------------------------------------------------------------


def received(log: Path) -> tuple[int, int, int, int]:
    """(points, overflow points, requests, points named by source pod) the receiver logged."""
    lines = [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []
    return sum(x[0] for x in lines), sum(x[1] for x in lines), len(lines), sum(x[3] for x in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--mode", choices=["fast", "sdk", "receiver", "apiserver", "kernel"])
    parser.add_argument("--kernel", action="store_true", help="also the real bcc datapath (root, netns)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--log", help="receiver: its log; apiserver, kernel: the agent's kubeconfig")
    args = parser.parse_args()
    if args.mode == "receiver":
        run_receiver(args.log)
        return 0
    if args.mode == "apiserver":
        run_apiserver(args.log, PODS)
        return 0
    if args.mode:
        if args.mode == "kernel":
            result = run_kernel(args.port, args.flows, args.log)
        else:
            result = {"fast": run_fast, "sdk": run_sdk}[args.mode](args.port, args.flows)
        print(json.dumps(result), flush=True)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kzt-bench-") as tmp:
        log = Path(tmp) / "received.log"
        receiver = subprocess.Popen(
            [sys.executable, __file__, "--mode", "receiver", "--log", str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = int(receiver.stdout.readline())  # type: ignore[union-attr]
            results = {}
            for mode in ("fast", "sdk"):
                before = received(log)
                argv = [sys.executable, __file__, "--mode", mode, "--port", str(port)]
                argv += ["--flows", str(args.flows)]
                out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
                results[mode] = json.loads(out.strip().splitlines()[-1])
                after = received(log)
                results[mode]["points"] = after[0] - before[0]
                results[mode]["overflow_points"] = after[1] - before[1]
                results[mode]["requests"] = after[2] - before[2]
                results[mode]["pod_points"] = after[3] - before[3]
        finally:
            receiver.terminate()
            receiver.wait()
        if args.kernel:
            results["kernel"] = kernel_bed(args.flows, Path(tmp))
    report(args.flows, results)
    return 0


def report(n: int, results: dict[str, dict[str, float]]) -> None:
    fast, sdk = results["fast"], results["sdk"]
    print(f"agent export, {n:,} active flows, 2 intervals, OTLP/gRPC to a local receiver")
    print(f"{'':26}{'fast path':>12}{'SDK path':>12}{'SDK/fast':>10}")
    for label, k in (("CPU s, interval 1 (cold)", "cpu_s_1"), ("CPU s, interval 2", "cpu_s_2")):
        print(f"{label:26}{fast[k]:12.3f}{sdk[k]:12.3f}{sdk[k] / fast[k]:10.1f}")
    print(
        f"{'peak RSS MB':26}{fast['peak_rss_mb']:12.1f}{sdk['peak_rss_mb']:12.1f}"
        f"{sdk['peak_rss_mb'] / fast['peak_rss_mb']:10.1f}"
    )
    print(f"{'RSS MB before export':26}{fast['rss_after_map_mb']:12.1f}{sdk['rss_after_map_mb']:12.1f}")
    print(f"{'points received':26}{fast['points']:12,.0f}{sdk['points']:12,.0f}")
    print(f"{'overflow points':26}{fast['overflow_points']:12,.0f}{sdk['overflow_points']:12,.0f}")
    print(f"{'requests':26}{fast['requests']:12,.0f}{sdk['requests']:12,.0f}")
    ok = fast["cpu_s_2"] <= 0.5 and fast["peak_rss_mb"] <= 150 and fast["points"] == 4 * n
    if "kernel" in results:
        k = results["kernel"]
        print(
            f"real bcc datapath ({n:,} real flows of {PODS} pods forwarded by the node, snapshot included, "
            f"metadata from the API server, health endpoint serving): "
            f"CPU s {k['cpu_s_1']:.3f} (cold), {k['cpu_s_2']:.3f} (half the flows changed; target 0.5); "
            f"peak RSS {k['peak_rss_mb']:.1f} MB (target 150; bcc/LLVM only in the loader child), after "
            f"the intervals {k['rss_after_1_mb']:.1f}, {k['rss_after_2_mb']:.1f} MB; "
            f"points {k['points']:,.0f}, named by source pod {k['pod_points']:,.0f}, "
            f"overflow points {k['overflow_points']:.0f}"
        )
        ok = ok and k["cpu_s_2"] <= 0.5 and k["peak_rss_mb"] <= 150 and k["overflow_points"] == 0
        ok = ok and k["pod_points"] == 4 * n
    verdict = "met" if ok else "MISSED"
    print(f"target (<= 0.5 s CPU per interval, <= 150 MB RSS, every point, none folded): {verdict}")


if __name__ == "__main__":
    sys.exit(main())
