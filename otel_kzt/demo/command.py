"""`otel-kzt demo`: a multi-zone cluster in network namespaces on this machine, with a live cross-zone view.

Real eBPF agents (one per simulated node, attached inside the node's namespace), a real enricher, real
traffic. `--once` runs for `--duration` (default 20s) and prints one final report; otherwise the view
refreshes every `--interval` until `--duration` or Ctrl-C (or `q`). `--apply-recommendations` (or the `a`
key) applies the enricher's prefer-same-zone recommendations mid-run, and the view shows the billed rate
before and after. Every way out removes all it created.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Final

from otel_kzt.configfile import check_keys, load_yaml, merge, parse_duration
from otel_kzt.demo.cluster import STYLES
from otel_kzt.demo.runner import ClusterRun, RunConfig
from otel_kzt.demo.session import Viewer
from otel_kzt.errors import ConfigError
from otel_kzt.signals import StopSignals

log = logging.getLogger(__name__)

ONCE_DEFAULT_DURATION_S = 20.0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # Ctrl-C, kill, a closed terminal


# Defaults in one place; every key is also a YAML key of `--config` (flags win over the file).
DEFAULTS: Final[dict[str, Any]] = {
    "zones": 3, "nodes_per_zone": 2, "interval": "2s", "duration": None, "once": False, "speed": 1.0,
    "top": 10, "metrics_port": 9464, "otlp_port": 4317, "prefix": "kzd", "net_id": 201, "style": "gke",
    "apply_recommendations": False, "apply_after": None, "savings_window": "1m",
}
APPLY_AFTER_DEFAULT_S = 60.0  # without --duration: when --apply-recommendations acts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", metavar="FILE", help="YAML file with any of the options below (flags win)")
    add("--zones", type=int, help="availability zones (default 3)")
    add("--nodes-per-zone", type=int, help="nodes in each zone (default 2)")
    add("--interval", help="agent export and view refresh interval (default 2s)")
    add("--duration", help=f"stop after this long (default: until Ctrl-C; {ONCE_DEFAULT_DURATION_S:.0f}s "
        "with --once)")
    add("--once", action="store_const", const=True, help="no live view: run, print one final report, exit 0")
    add("--speed", type=float, help="traffic rate multiplier (default 1.0)")
    add("--top", type=int, help="talkers shown (default 10)")
    add("--apply-recommendations", action="store_const", const=True,
        help="apply the prefer-same-zone recommendations mid-run (half of --duration, or --apply-after)")
    add("--apply-after", help=f"when --apply-recommendations acts (default: half of --duration, else "
        f"{APPLY_AFTER_DEFAULT_S:.0f}s)")
    add("--savings-window", help="the enricher's --savings-window (default 1m: a short demo)")
    add("--metrics-port", type=int, help="enricher /metrics port on 127.0.0.1 (default 9464)")
    add("--otlp-port", type=int, help="enricher OTLP/gRPC port on the fabric (default 4317)")
    # For the end-to-end tests and parallel runs: namespace prefix and address plan id.
    add("--prefix", help=argparse.SUPPRESS)
    add("--net-id", type=int, help=argparse.SUPPRESS)
    add("--style", choices=STYLES, help=argparse.SUPPRESS)  # node names as GKE (default) or EKS write them


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Flags over the `--config` file over DEFAULTS; unknown file keys are errors."""
    file_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    check_keys(file_values, frozenset(DEFAULTS), "")
    flags = {k: getattr(args, k, None) for k in DEFAULTS}
    return {**DEFAULTS, **merge(file_values, flags)}


def _int(v: dict[str, Any], key: str, low: int, high: int) -> int:
    value = v[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(key, f"must be an integer within {low}..{high}, got {value!r}")
    return value


@dataclass(frozen=True)
class DemoConfig:
    run: RunConfig
    duration_s: float | None  # None: until interrupted
    once: bool
    top: int
    apply_after_s: float | None = None  # --apply-recommendations: seconds after traffic starts


def config_from(args: argparse.Namespace) -> DemoConfig:
    """The validated demo config; bad values raise ConfigError naming their field."""
    v = settings(args)
    zones = _int(v, "zones", 1, 26)
    per_zone = _int(v, "nodes_per_zone", 1, 100 // zones)
    speed = v["speed"]
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not speed > 0:
        raise ConfigError("speed", f"must be a positive number, got {speed!r}")
    interval = parse_duration(v["interval"], "interval")
    if interval < 0.2:
        raise ConfigError("interval", "must be at least 200ms")
    duration = parse_duration(v["duration"], "duration") if v["duration"] is not None else None
    if duration is None and v["once"]:
        duration = ONCE_DEFAULT_DURATION_S
    style = v["style"]
    if style not in STYLES:
        raise ConfigError("style", f"must be one of {', '.join(STYLES)}, got {style!r}")
    if not isinstance(v["prefix"], str) or not v["prefix"].isalnum() or len(v["prefix"]) > 6:
        raise ConfigError("prefix", "must be 1 to 6 letters or digits (it names namespaces and links)")
    window = parse_duration(v["savings_window"], "savings_window")
    cfg = RunConfig(prefix=v["prefix"], net_id=_int(v, "net_id", 1, 250), zones=zones,
                    nodes_per_zone=per_zone, interval_s=interval, grpc_port=_int(v, "otlp_port", 1, 65535),
                    metrics_port=_int(v, "metrics_port", 1, 65535), speed=float(speed), style=style,
                    enricher_args=("--savings-window", f"{window}s"))
    return DemoConfig(run=cfg, duration_s=duration, once=bool(v["once"]), top=_int(v, "top", 1, 1000),
                      apply_after_s=_apply_after(v, duration))


def _apply_after(v: dict[str, Any], duration: float | None) -> float | None:
    if v["apply_after"] is not None and not v["apply_recommendations"]:
        raise ConfigError("apply_after", "needs --apply-recommendations")
    if not v["apply_recommendations"]:
        return None
    if v["apply_after"] is not None:
        after = parse_duration(v["apply_after"], "apply_after")
    else:
        after = duration / 2 if duration is not None else APPLY_AFTER_DEFAULT_S
    if duration is not None and after >= duration:
        raise ConfigError("apply_after", f"must be before the end of --duration ({duration:.0f}s)")
    return after


def run(args: argparse.Namespace) -> int:
    """Signals only set `stop` (`otel_kzt.signals`): a second Ctrl-C during clean-up cannot cut it short."""
    demo = config_from(args)
    with StopSignals(STOP_SIGNALS) as signals:
        cluster_run = ClusterRun(demo.run, stop=signals.stop)
        try:
            return _show(cluster_run, demo, signals.stop)
        finally:
            cluster_run.close()


def _show(cluster_run: ClusterRun, demo: DemoConfig, stop: threading.Event) -> int:
    log.info("starting: %d nodes, enricher on %s, logs in %s", len(cluster_run.cluster.nodes),
             cluster_run.metrics_url, cluster_run.workdir)
    cluster_run.start(traffic=False)  # raises Interrupted once `stop` is set
    viewer = Viewer(cluster_run, demo.duration_s, demo.top, live=not demo.once,
                    apply_after_s=demo.apply_after_s)  # the baseline, before any traffic
    cluster_run.start_traffic()
    viewer.loop(stop)
    if stop.is_set():
        log.info("stopping")
        viewer.scrape()
    engine = cluster_run.engine
    if engine is not None:
        log.info("traffic: requests ok=%d failed=%d", engine.requests_ok, engine.requests_failed)
    sys.stdout.write("\n" + viewer.report() + "\n")
    sys.stdout.flush()
    return 0
