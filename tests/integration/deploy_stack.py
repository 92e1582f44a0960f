"""Real processes on 127.0.0.1 for the deployment tests: `otel-kzt enricher` and Debian's Prometheus.

- `EnricherProcess`: `otel-kzt enricher` as a subprocess (the real command, real ports), fed a metadata file.
- `PrometheusProcess`: /usr/bin/prometheus with a temporary config and TSDB, 1s scrapes, an API helper.
Everything binds ephemeral ports on 127.0.0.1 and is stopped by `stop()`, which the fixtures call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support import ports
from tests.support.processes import CLI

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    return ports.free_port(LOCALHOST)


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
    """`otel-kzt enricher` on ephemeral ports, flow logs off stdout; metadata from a file, or `metadata` is
    its flags (`ServedCluster.args(ENRICHER)`: the API server, with the enricher's own token)."""

    def __init__(
        self,
        workdir: Path,
        metadata: Path | Sequence[str],
        name: str,
        extra: Sequence[str] = (),
        grpc_port: int | None = None,
        *,
        wrapper: Sequence[str] = (),
    ) -> None:
        """`wrapper` runs it through another command (`nsenter --net=...`: a network namespace's 127.0.0.1;
        the ports are picked free on the host's, and a fresh namespace has every port free)."""
        self.name = name
        self.grpc_port, self.http_port, self.metrics_port = grpc_port or free_port(), free_port(), free_port()
        args = [
            *wrapper,
            *CLI,
            "--log-level",
            "WARNING",
            "enricher",
            *(["--kube-metadata", str(metadata)] if isinstance(metadata, Path) else metadata),
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
