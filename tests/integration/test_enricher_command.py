"""`otel-kzt enricher` as a process: flags, flow logs on stdout, SIGTERM flushes the exporters and exits 0,
and after SIGKILL a restart from a stale --state-file brings the /metrics totals back exact."""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Aggregates
from otel_kzt.enricher.state.checkpoint_format import decode
from tests.integration.test_enricher_badinput import good_request, post
from tests.integration.test_enricher_prometheus import send
from tests.integration.test_enricher_service import (
    POD_IPS,
    RUN_START_NS,
    Downstream,
    downstream,
    get,
    metadata_file,
)
from tests.support.processes import CLI

__all__ = ["downstream", "metadata_file"]
REPO = Path(__file__).resolve().parents[2]


def enricher_argv(metadata: Path) -> list[str]:
    """An enricher on free local ports."""
    return [
        *CLI,
        "enricher",
        "--kube-metadata",
        str(metadata),
        "--grpc-endpoint",
        "127.0.0.1:0",
        "--http-endpoint",
        "127.0.0.1:0",
        "--metrics-endpoint",
        "127.0.0.1:0",
    ]


def start(metadata: Path, *flags: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    argv = [*enricher_argv(metadata), *flags]
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
        # Generous: a loaded CI machine may take seconds; posting before readiness would mark it unknown.
        deadline = time.monotonic() + 30
        while get(f"http://127.0.0.1:{ports['metrics']}/readyz")[0] != 200:
            assert time.monotonic() < deadline, "enricher never became ready"
            time.sleep(0.05)
        assert post(ports["http"], good_request().SerializeToString())[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
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
        [*CLI, "enricher", "--config", str(bad)],
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
                *CLI,
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


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def wait_for(check: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def cross_zone(port: int, pod: str, namespace: str) -> float | None:
    key = (schema.PROM_POD_CROSS_ZONE_BYTES + "_total", (("namespace", namespace), ("pod", pod)))
    return metrics(port).get(key)


def ready(ports: dict[str, int]) -> None:
    wait_for(lambda: get(f"http://127.0.0.1:{ports['metrics']}/readyz")[0] == 200, "not ready")


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def shown(port: int, pod: str, namespace: str, want: float, what: str) -> None:
    """Until /metrics shows `want`: it shows what the last checkpoint wrote (every 200 ms here), rebuilt
    at most once a second."""
    wait_for(lambda: cross_zone(port, pod, namespace) == want, f"{what}: {pod} never showed {want}")


@pytest.mark.integration
def test_sigkill_then_restart_from_stale_state_file_gives_exact_totals(
    metadata_file: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state.json.zst"
    flags = ("--state-file", str(state), "--checkpoint-interval", "200ms", "--no-flow-logs-stdout")
    web, cache, api, etl = (POD_IPS[p] for p in ("web-1", "cache-1", "api-1", "etl-1"))
    t, s = RUN_START_NS, RUN_START_NS
    proc, ports = start(metadata_file, *flags)
    try:
        ready(ports)
        send(ports["http"], [(web, cache, 1_000, s), (api, etl, 50, s)], t := t + 10**9)
        shown(ports["metrics"], "web-1", "shop", 1_000, "first report")  # shown, so on disk
        send(ports["http"], [(web, cache, 5_000, s), (api, etl, 80, s)], t := t + 10**9)
    finally:
        kill9(proc)  # the 5000 / 80 may or may not have reached the disk
    stale = decode(state.read_bytes(), frozenset(Aggregates(()).families()))
    on_disk = stale.totals["pod_cross_zone"][("shop", "web-1")]
    assert on_disk in (1_000, 5_000)

    proc, ports = start(metadata_file, *flags)
    try:
        ready(ports)
        # restored before any report: never less than Prometheus could have scraped
        assert cross_zone(ports["metrics"], "web-1", "shop") == on_disk
        send(ports["http"], [(web, cache, 7_000, s), (api, etl, 90, s)], t := t + 10**9)
        # not 1000 + 7000, not 7000 - 4000
        shown(ports["metrics"], "web-1", "shop", 7_000, "after the restart")
        assert cross_zone(ports["metrics"], "api-1", "batch") is None
        assert cross_zone(ports["metrics"], "api-1", "shop") == 90
        send(ports["http"], [(web, cache, 9_000, s)], t := t + 10**9)
        shown(ports["metrics"], "web-1", "shop", 9_000, "second report")
    finally:
        kill9(proc)

    # What Prometheus last saw is never more than what the next process starts from: no dip, no reset.
    proc, ports = start(metadata_file, *flags)
    try:
        ready(ports)
        assert cross_zone(ports["metrics"], "web-1", "shop") == 9_000
        send(ports["http"], [(web, cache, 9_500, s)], t + 10**9)
        shown(ports["metrics"], "web-1", "shop", 9_500, "after the second restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
