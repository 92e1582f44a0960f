"""`otel-kzt enricher` as a process: flags, flow logs on stdout, SIGTERM flushes the exporters and exits 0."""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_enricher_badinput import good_request, post
from tests.integration.test_enricher_service import Downstream, downstream, get, metadata_file

__all__ = ["downstream", "metadata_file"]
REPO = Path(__file__).resolve().parents[2]


def start(metadata: Path, *flags: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    argv = [
        sys.executable,
        "-m",
        "otel_kzt.cli",
        "enricher",
        "--kube-metadata",
        str(metadata),
        "--grpc-endpoint",
        "127.0.0.1:0",
        "--http-endpoint",
        "127.0.0.1:0",
        "--metrics-endpoint",
        "127.0.0.1:0",
        *flags,
    ]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"enricher running ports=(\{.*\})", line)
        if match:
            return proc, ast.literal_eval(match.group(1))
    proc.kill()
    raise AssertionError(f"enricher did not start: exit {proc.wait()}")


@pytest.mark.integration
def test_sigterm_flushes_and_flow_logs_go_to_stdout(metadata_file: Path, downstream: Downstream) -> None:
    proc, ports = start(
        metadata_file, "--export-endpoint", f"127.0.0.1:{downstream.port}", "--shutdown-timeout", "5s"
    )
    try:
        for _ in range(100):
            if get(f"http://127.0.0.1:{ports['metrics']}/readyz")[0] == 200:
                break
            time.sleep(0.05)
        assert post(ports["http"], good_request().SerializeToString())[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    flow = json.loads(out.splitlines()[0])
    assert flow["kzt.traffic.class"] == "cross-zone" and flow["kzt.flow.bytes"] == 123
    assert flow["source.k8s.pod.name"] == "web-1" and flow["destination.k8s.pod.name"] == "cache-1"
    got = downstream.metrics.get(timeout=5)  # flushed before exit
    assert got.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0].as_int == 123


@pytest.mark.integration
def test_bad_config_exits_2_and_busy_port_exits_1(metadata_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("series_ttl: forever\n")
    result = subprocess.run(
        [sys.executable, "-m", "otel_kzt.cli", "enricher", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "series_ttl" in result.stderr
    proc, ports = start(metadata_file)
    try:
        clash = subprocess.run(
            [
                sys.executable,
                "-m",
                "otel_kzt.cli",
                "enricher",
                "--kube-metadata",
                str(metadata_file),
                "--metrics-endpoint",
                f"127.0.0.1:{ports['metrics']}",
                "--grpc-endpoint",
                "",
                "--http-endpoint",
                "",
            ],
            cwd=REPO,
            capture_output=True,
            check=False,
            text=True,
            timeout=30,
        )
        assert clash.returncode == 1 and "cannot start" in clash.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
