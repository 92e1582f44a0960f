"""A real stack on 127.0.0.1 for the deployment tests: enricher processes, Prometheus, in-process agents.

- `EnricherProcess`: `otel-kzt enricher` as a subprocess (the real command, real ports), fed a metadata file.
- `PrometheusProcess`: Debian's /usr/bin/prometheus with a temporary config and TSDB, 1s scrapes.
- `Agent`: the agent's own interval loop (`AgentService`), naming (`LocalFlows`) and export layer
  (`Exporter`: rendezvous choice, failover, retries) over real gRPC, fed by `FakeDatapath` instead of the
  kernel: the scale-out question is about routing and totals, not about counting packets.
Everything binds ephemeral ports on 127.0.0.1 and is stopped in `close()`, which the fixtures call.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from otel_kzt.agent.config import AgentConfig, OtlpConfig
from otel_kzt.agent.export import Exporter, ExportResult
from otel_kzt.agent.flows import AF_INET, FlowCounters, FlowKey, Snapshot
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.service import AgentService
from otel_kzt.k8s import MetadataHandle, open_metadata
from tests.support.k8s_objects import as_list, make_node, make_pod

LOCALHOST = "127.0.0.1"

# Three nodes in two zones (AWS, so the price table applies), pods named after their workloads.
NODES = {
    "kx-a1": ("192.168.61.1", "us-east-1a"),
    "kx-a2": ("192.168.61.2", "us-east-1a"),
    "kx-b1": ("192.168.61.3", "us-east-1b"),
}
PODS = {  # name -> (node, ip, owner kind, owner name)
    "web-5f7d9c8b6d-x1x1x": ("kx-a1", "10.61.1.10", "ReplicaSet", "web-5f7d9c8b6d"),
    "api-6c8b7d9f5a-y2y2y": ("kx-a2", "10.61.2.20", "ReplicaSet", "api-6c8b7d9f5a"),
    "cache-0": ("kx-b1", "10.61.3.30", "StatefulSet", "cache"),
}
EXTERNAL = "203.0.113.7"
# Per node: (source ip, destination ip, protocol, src port, dst port, bytes per tick, packets per tick).
FLOWS: dict[str, list[tuple[str, str, int, int, int, int, int]]] = {
    "kx-a1": [
        ("10.61.1.10", "10.61.3.30", 6, 0, 6379, 150_000, 110),  # web -> cache: cross-zone
        ("10.61.1.10", "10.61.2.20", 6, 0, 8080, 40_000, 35),  # web -> api: same-zone
        ("10.61.1.10", EXTERNAL, 6, 0, 443, 9_000, 12),
    ],  # web -> internet: external
    "kx-a2": [
        ("10.61.2.20", "10.61.3.30", 6, 0, 6379, 70_000, 60),  # api -> cache: cross-zone
        ("10.61.2.20", "10.61.1.10", 6, 8080, 0, 35_000, 30),
    ],  # api's answers: same-zone
    "kx-b1": [
        ("10.61.3.30", "10.61.1.10", 6, 6379, 0, 260_000, 190),  # cache's answers: cross-zone
        ("10.61.3.30", "10.61.2.20", 6, 6379, 0, 120_000, 95),
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


def write_metadata(path: Path) -> Path:
    nodes = [
        make_node(n, [ip], zone=zone, provider_id=f"aws:///{zone}/i-{n}") for n, (ip, zone) in NODES.items()
    ]
    pods = [
        make_pod(
            name,
            node,
            [ip],
            owner=(kind, owner),
            template_hash=None if kind != "ReplicaSet" else owner.rsplit("-", 1)[1],
        )
        for name, (node, ip, kind, owner) in PODS.items()
    ]
    path.write_text(json.dumps(as_list(nodes + pods)))
    return path


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class _Process:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


class EnricherProcess(_Process):
    """`otel-kzt enricher` on ephemeral ports, metadata from a file, flow logs off stdout."""

    def __init__(
        self,
        workdir: Path,
        metadata: Path,
        name: str,
        extra: Sequence[str] = (),
        grpc_port: int | None = None,
    ) -> None:
        self.name = name
        self.grpc_port, self.http_port, self.metrics_port = grpc_port or free_port(), free_port(), free_port()
        args = [
            sys.executable,
            "-m",
            "otel_kzt.cli",
            "--log-level",
            "WARNING",
            "enricher",
            "--kube-metadata",
            str(metadata),
            "--no-flow-logs-stdout",
            "--grpc-endpoint",
            f"{LOCALHOST}:{self.grpc_port}",
            "--http-endpoint",
            f"{LOCALHOST}:{self.http_port}",
            "--metrics-endpoint",
            f"{LOCALHOST}:{self.metrics_port}",
            *extra,
        ]
        super().__init__(args, workdir / f"{name}.log")

    @property
    def otlp_url(self) -> str:
        return f"http://{LOCALHOST}:{self.grpc_port}"

    @property
    def metrics_target(self) -> str:
        return f"{LOCALHOST}:{self.metrics_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"enricher {self.name} exited:\n{self.tail()}"
            return http_get(f"http://{self.metrics_target}/readyz")[0] == 200

        wait_for(ready, timeout, f"enricher {self.name} /readyz")


class PrometheusProcess(_Process):
    """Debian's Prometheus scraping the given jobs every second; rules optional."""

    def __init__(self, workdir: Path, jobs: dict[str, list[str]], rule_files: Sequence[Path] = ()) -> None:
        binary = "/usr/bin/prometheus"
        assert os.access(binary, os.X_OK), (
            "prometheus missing: run scripts/setup.sh (Debian package prometheus)"
        )
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()
            ],
        }
        config_path = workdir / "kx-prometheus.yaml"
        config_path.write_text(yaml.safe_dump(config))
        args = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'kx-tsdb'}",
            f"--web.listen-address={LOCALHOST}:{self.port}",
            "--log.level=warn",
            "--storage.tsdb.retention.time=1h",
        ]
        super().__init__(args, workdir / "prometheus.log")
        wait_for(lambda: http_get(f"{self.url}/-/ready")[0] == 200, 30, "prometheus /-/ready")

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def api(self, path: str, **params: str) -> dict[str, Any]:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10)
        data: dict[str, Any] = json.loads(body) if body else {"status": "error", "error": f"HTTP {status}"}
        return data

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["status"] == "success", f"{expr}: {data.get('error')}"
        result: list[dict[str, Any]] = data["data"]["result"]
        return result


def _addr(text: str) -> bytes:
    return socket.inet_aton(text)


class FakeDatapath:
    """Cumulative per-flow counters growing by a fixed step per snapshot until frozen (the kernel's role)."""

    def __init__(self, node: str, start_unix_ns: int) -> None:
        self._flows = {
            FlowKey(AF_INET, _addr(s), _addr(d), proto, sp, dp): (b, p)
            for s, d, proto, sp, dp, b, p in FLOWS[node]
        }
        self._ticks = 0
        self._start = start_unix_ns
        self._lock = threading.Lock()
        self.frozen = threading.Event()

    def snapshot(self) -> Snapshot:
        with self._lock:
            if not self.frozen.is_set():
                self._ticks += 1
            ticks = self._ticks
        now = time.time_ns()
        flows = {k: FlowCounters(b * ticks, p * ticks, self._start, now) for k, (b, p) in self._flows.items()}
        return Snapshot(flows, 0, 0, 65536, now)

    def evict(self, keys: Iterable[FlowKey]) -> int:
        return 0  # flows never go idle in these tests

    def totals(self) -> dict[FlowKey, tuple[int, int]]:
        with self._lock:
            return {k: (b * self._ticks, p * self._ticks) for k, (b, p) in self._flows.items()}


class Tee:
    """Sends each request to the main exporter and, unchanged, to a reference exporter."""

    def __init__(self, main: Exporter, reference: Exporter | None) -> None:
        self.main, self.reference = main, reference

    def export(self, requests: Iterable[bytes], deadline: float, stop: threading.Event) -> ExportResult:
        batch = list(requests)
        if self.reference is not None:
            self.reference.export(batch, deadline, stop)
        return self.main.export(batch, deadline, stop)

    def close(self) -> None:
        self.main.close()
        if self.reference is not None:
            self.reference.close()


@dataclass
class Agent:
    node: str
    datapath: FakeDatapath
    exporter: Exporter
    service: AgentService
    metadata: MetadataHandle
    sender: Tee
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        self.sender.close()
        self.metadata.shutdown()


def start_agent(
    node: str,
    endpoints: Sequence[str],
    metadata: Path,
    *,
    interval_s: float = 0.5,
    reference: str | None = None,
    down_s: float = 30.0,
) -> Agent:
    """The agent's loop for `node`, exporting over gRPC to `endpoints` (and a copy to `reference`)."""
    otlp = OtlpConfig(endpoints=tuple(endpoints), timeout_s=2.0)
    config = AgentConfig(node_name=node, pin=False, interval_s=interval_s, otlp=otlp)
    handle = open_metadata(str(metadata), node_name=node)
    handle.start()
    assert handle.wait_ready(10), "metadata file did not load"
    exporter = Exporter(otlp, node, down_s=down_s, max_backoff_s=1.0)
    ref = Exporter(replace(otlp, endpoints=(reference,)), node) if reference else None
    sender = Tee(exporter, ref)
    node_ip = NODES[node][0]
    local = LocalFlows(node, handle.index, interface_addresses=lambda: frozenset({node_ip}))
    datapath = FakeDatapath(node, time.time_ns())
    service = AgentService(config, datapath, sender, local, handle.index, host_name=node)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name=f"kx-agent-{node}", daemon=True)
    thread.start()
    return Agent(node, datapath, exporter, service, handle, sender, stop, thread)
