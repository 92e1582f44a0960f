"""Starts and stops everything of one simulated cluster: topology, enricher, one agent per node, traffic.

`ClusterRun` is shared by `otel-kzt demo` and the end-to-end tests. `close()` is safe twice and after a
half-finished `start()`, and leaves nothing behind: processes are stopped, every node's agent is asked to
`--cleanup` (detach and unpin), namespaces and the host's fabric link are removed. A lock file under /run
keeps two runs of the same prefix apart.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from otel_kzt import schema
from otel_kzt.demo import kubeproxy, metadata, services, topology
from otel_kzt.demo.cluster import Cluster, NodeSpec, make_cluster
from otel_kzt.demo.services import ServiceSpec
from otel_kzt.demo.traffic import Engine
from otel_kzt.demo.view import parse
from otel_kzt.demo.workloads import Story, build_story
from otel_kzt.errors import KztError
from otel_kzt.netns import Topology, netns_exists, popen_in, run_in

log = logging.getLogger(__name__)

LOCK_DIR = Path("/run")
STOP_TIMEOUT_S = 10.0
# Children run in their own session (a Ctrl-C reaches only us; we stop them in order), so they would
# outlive a demo killed outright: the parent-death signal ends them then.
ORPHAN_GUARD = ("setpriv", "--pdeathsig", "TERM", "--")


class DemoBusy(KztError):
    """Another run holds the lock of this prefix."""


class Interrupted(KztError):
    """`stop` was set (a signal) while the run was still starting."""


@dataclass(frozen=True)
class RunConfig:
    prefix: str = "kzd"
    net_id: int = 201
    zones: int = 3
    nodes_per_zone: int = 2
    interval_s: float = 1.0
    grpc_port: int = 4317
    metrics_port: int = 9464
    speed: float = 1.0
    style: str = "gke"  # node names and provider IDs as GKE or EKS writes them
    enricher_args: tuple[str, ...] = ()  # extra flags (the tests ask for pod-level aggregation)
    workdir: Path | None = None  # logs and the metadata file; a fresh temporary directory when None
    lock_dir: Path = LOCK_DIR


class RunLock:
    """An exclusive flock on `<lock_dir>/otel-kzt-<prefix>.lock`, holding the owner's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 -- held open for the whole run, closed in release()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise DemoBusy(f"another otel-kzt demo is running (pid {owner}, lock {self.path}); "
                           "stop it first (Ctrl-C in its terminal)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.truncate(0)
            fh.close()


@dataclass
class ClusterRun:
    config: RunConfig
    cluster: Cluster = field(init=False)
    story: Story = field(init=False)
    workdir: Path = field(init=False)
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    enricher: subprocess.Popen[bytes] | None = None
    engine: Engine | None = None
    services: dict[tuple[str, str], ServiceSpec] = field(init=False)  # as routed now
    stop: threading.Event = field(default_factory=threading.Event)  # set: the waits of start() give up

    def __post_init__(self) -> None:
        cfg = self.config
        self.cluster = make_cluster(cfg.prefix, cfg.net_id, cfg.zones, cfg.nodes_per_zone, cfg.style)
        self.story = build_story(self.cluster, cfg.speed)
        self.services = {(s.namespace, s.name): s for s in self.story.services}
        self.workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix=f"otel-kzt-{cfg.prefix}-"))
        self._lock = RunLock(cfg.lock_dir / f"otel-kzt-{cfg.prefix}.lock")
        self._topo = Topology()
        self._logs: list[IO[bytes]] = []
        self._started = False

    @property
    def metadata_file(self) -> Path:
        return self.workdir / "cluster.json"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}/metrics"

    @property
    def web_url(self) -> str:
        """The enricher's metrics port: web view at `/`, `/api/v1/*`."""
        return f"http://127.0.0.1:{self.config.metrics_port}"

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{self.cluster.plan.host(4)}:{self.config.grpc_port}"

    # --- start ----------------------------------------------------------------------------------------

    def start(self, traffic: bool = True, ready_timeout_s: float = 90.0) -> None:
        """Build the cluster, start enricher and agents, wait until every agent reported; then traffic."""
        try:
            self._lock.acquire()
        except DemoBusy:
            if self.config.workdir is None:
                self.workdir.rmdir()  # ours and still empty: a refused run leaves no trace either
            raise
        self._started = True
        topology.remove_stale(self.cluster)
        for node in self.cluster.nodes:
            self.cleanup_agent(node)  # pins a killed run may have left
        self._check_stop()
        topology.build(self.cluster, self._topo)
        self.write_metadata()
        kubeproxy.install(self.cluster, self.service_objects(), self._topo)
        self.start_enricher()
        for node in self.cluster.nodes:
            self.start_agent(node)
        self.wait_agents_reported(ready_timeout_s)
        if traffic:
            self.start_traffic()

    def service_objects(self) -> list[dict[str, Any]]:
        return services.objects(self.cluster, tuple(self.services.values()))

    def write_metadata(self) -> None:
        """The cluster's objects as routed now, where agents and enricher read them (re-read on change)."""
        metadata.write(self.cluster, self.metadata_file, tuple(self.services.values()))

    def set_traffic_distribution(self, namespace: str, name: str, value: str | None) -> bool:
        """Change a Service's trafficDistribution as `kubectl patch` would: the Service, its slices' hints
        (the EndpointSlice controller's part) and the nodes' DNAT rules (kube-proxy's) follow. False when
        the Service is not the story's or already routed so."""
        spec = self.services.get((namespace, name))
        if spec is None or spec.headless or spec.traffic_distribution == value:
            return False
        self.services[(namespace, name)] = spec.with_distribution(value)
        self.write_metadata()
        kubeproxy.sync_all(self.cluster, self.service_objects())
        log.info("service routed namespace=%s service=%s trafficDistribution=%s", namespace, name, value)
        return True

    def start_traffic(self) -> None:
        """The story's continuous traffic (the tests use bounded traffic instead)."""
        if self.engine is None:
            self.engine = Engine(self.story.listeners, self.story.calls)
            self.engine.start()

    def _log_file(self, name: str) -> IO[bytes]:
        fh = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 -- closed in close()
        self._logs.append(fh)
        return fh

    def enricher_argv(self) -> list[str]:
        cfg = self.config
        return [sys.executable, "-m", "otel_kzt.cli", "enricher", "--kube-metadata", str(self.metadata_file),
                "--grpc-endpoint", f"{self.cluster.plan.host(4)}:{cfg.grpc_port}", "--http-endpoint", "",
                "--metrics-endpoint", f"127.0.0.1:{cfg.metrics_port}", *cfg.enricher_args]

    def start_enricher(self) -> None:
        out = self._log_file("enricher")
        self.enricher = subprocess.Popen([*ORPHAN_GUARD, *self.enricher_argv()], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.enricher.poll() is not None:
                raise KztError(f"the enricher exited with {self.enricher.returncode}; see {out.name}")
            try:
                self.scrape()
                return
            except OSError:
                self._pause(0.2)
        raise KztError(f"the enricher did not serve {self.metrics_url} within 30s; see {out.name}")

    def agent_argv(self, node: NodeSpec) -> list[str]:
        return [sys.executable, "-m", "otel_kzt.cli", "agent", "--node-name", node.name,
                "--kube-metadata", str(self.metadata_file), "--otlp-endpoint", self.otlp_endpoint,
                "--interval", f"{self.config.interval_s}s"]

    def start_agent(self, node: NodeSpec) -> None:
        out = self._log_file(f"agent-{node.index}")
        self.agents[node.name] = popen_in(node.netns, [*ORPHAN_GUARD, *self.agent_argv(node)], stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def wait_agents_reported(self, timeout_s: float) -> None:
        """Until the enricher has heard from every node's agent (its last-report gauge names them all)."""
        want = {n.name for n in self.cluster.nodes}
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        while time.monotonic() < deadline:
            for name, proc in self.agents.items():
                if proc.poll() is not None:
                    raise KztError(f"the agent of {name} exited with {proc.returncode}; see {self.workdir}")
            try:
                seen = reported_nodes(self.scrape())
            except OSError:
                seen = set()
            if want <= seen:
                return
            self._pause(0.5)
        raise KztError(f"agents of {sorted(want - seen)} did not report within {timeout_s:.0f}s; "
                       f"logs in {self.workdir}")

    def _pause(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted("stopped while starting")

    def _check_stop(self) -> None:
        self._pause(0.0)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return str(resp.read().decode())

    # --- stop -----------------------------------------------------------------------------------------

    def stop_agent(self, node: NodeSpec, kill: bool = False) -> None:
        proc = self.agents.pop(node.name, None)
        if proc is not None:
            stop_process(proc, kill)

    def stop_enricher(self, kill: bool = False) -> None:
        if self.enricher is not None:
            stop_process(self.enricher, kill)
            self.enricher = None

    def cleanup_agent(self, node: NodeSpec) -> None:
        argv = [sys.executable, "-m", "otel_kzt.cli", "agent", "--cleanup", "--node-name", node.name]
        # In the node's namespace when it still exists: the same view of the links the agent had.
        proc = run_in(node.netns if netns_exists(node.netns) else None, argv, check=False)
        if proc.returncode != 0:
            log.warning("agent clean-up failed node=%s error=%s", node.name,
                        (proc.stderr.strip().splitlines() or ["?"])[-1])

    def close(self) -> None:
        """Stop everything and remove every trace; safe twice and after a failed start."""
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        for node in self.cluster.nodes:
            self.stop_agent(node)
        if self._started:
            for node in self.cluster.nodes:
                self.cleanup_agent(node)
        self.stop_enricher()
        try:
            self._topo.close()
        finally:
            for fh in self._logs:
                fh.close()
            self._logs = []
            if self._started:
                self._lock.release()
                self._started = False


def stop_process(proc: subprocess.Popen[bytes], kill: bool = False) -> None:
    """SIGTERM (or SIGKILL), wait, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("process did not stop within %.0fs, killing pid=%d", STOP_TIMEOUT_S, proc.pid)
            proc.kill()
            proc.wait()


def reported_nodes(metrics_text: str) -> set[str]:
    """Node names in the enricher's agent last-report gauge."""
    scrape = parse(metrics_text, 0.0)
    label = schema.ENRICHER_AGENT_LAST_REPORT_LABEL
    return {labels.get(label, "") for labels, _ in scrape.samples.get(schema.ENRICHER_AGENT_LAST_REPORT, [])}
