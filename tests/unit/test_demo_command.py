"""`otel-kzt demo` flags and the one-demo-at-a-time lock (no namespaces needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from otel_kzt.demo.command import ONCE_DEFAULT_DURATION_S, add_arguments, config_from
from otel_kzt.demo.runner import DemoBusy, RunLock
from otel_kzt.errors import ConfigError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_and_once() -> None:
    cfg, duration = config_from(_args())
    assert (cfg.zones, cfg.nodes_per_zone, cfg.metrics_port, cfg.grpc_port) == (3, 2, 9464, 4317)
    assert duration is None
    _, duration = config_from(_args("--once"))
    assert duration == ONCE_DEFAULT_DURATION_S
    cfg, duration = config_from(_args("--once", "--duration", "1m", "--interval", "500ms"))
    assert duration == 60.0 and cfg.interval_s == 0.5


@pytest.mark.parametrize(("argv", "field"), [
    (["--zones", "0"], "--zones"),
    (["--nodes-per-zone", "0"], "--nodes-per-zone"),
    (["--zones", "20", "--nodes-per-zone", "6"], "--nodes-per-zone"),
    (["--interval", "10ms"], "--interval"),
    (["--duration", "soon"], "--duration"),
    (["--speed", "0"], "--speed"),
    (["--metrics-port", "70000"], "--metrics-port"),
])
def test_bad_flags_name_the_field(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(_args(*argv))
    assert info.value.field == field


def test_second_run_gets_a_clear_error(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path / "x.lock"), RunLock(tmp_path / "x.lock")
    first.acquire()
    try:
        with pytest.raises(DemoBusy, match=r"another otel-kzt demo is running \(pid \d+"):
            second.acquire()
    finally:
        first.release()
    second.acquire()  # free again once the first let go
    second.release()
