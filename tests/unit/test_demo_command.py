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
    demo = config_from(_args())
    cfg = demo.run
    assert (cfg.zones, cfg.nodes_per_zone, cfg.metrics_port, cfg.grpc_port) == (3, 2, 9464, 4317)
    assert (demo.duration_s, demo.once, demo.top, cfg.prefix) == (None, False, 10, "kzd")
    assert config_from(_args("--once")).duration_s == ONCE_DEFAULT_DURATION_S
    demo = config_from(_args("--once", "--duration", "1m", "--interval", "500ms"))
    assert demo.duration_s == 60.0 and demo.run.interval_s == 0.5


def test_yaml_twin_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text("zones: 2\nnodes_per_zone: 3\nspeed: 0.5\nonce: true\nduration: 30s\n")
    demo = config_from(_args("--config", str(path), "--zones", "4"))
    assert (demo.run.zones, demo.run.nodes_per_zone, demo.run.speed) == (4, 3, 0.5)
    assert demo.once and demo.duration_s == 30.0


@pytest.mark.parametrize(("text", "field"), [("zone: 2\n", "zone"), ("zones: two\n", "zones"),
                                             ("speed: true\n", "speed"), ("- 1\n", "--config")])
def test_bad_yaml_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_from(_args("--config", str(path)))
    assert info.value.field == field


@pytest.mark.parametrize(("argv", "field"), [
    (["--zones", "0"], "zones"),
    (["--nodes-per-zone", "0"], "nodes_per_zone"),
    (["--zones", "20", "--nodes-per-zone", "6"], "nodes_per_zone"),
    (["--interval", "10ms"], "interval"),
    (["--duration", "soon"], "duration"),
    (["--speed", "0"], "speed"),
    (["--metrics-port", "70000"], "metrics_port"),
    (["--top", "0"], "top"),
    (["--prefix", "kz-toolong"], "prefix"),
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
