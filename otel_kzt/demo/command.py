"""`otel-kzt demo`: a multi-zone cluster in network namespaces on this machine, with a live cross-zone view.

Real eBPF agents (one per simulated node, attached inside the node's namespace), a real enricher, real
traffic. `--once` runs for `--duration` (default 20s) and prints one final report; otherwise the view
refreshes every `--interval` until `--duration` or Ctrl-C. Every way out removes all it created.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

from otel_kzt.configfile import check_keys, load_yaml, merge, parse_duration
from otel_kzt.demo.cluster import STYLES
from otel_kzt.demo.runner import ClusterRun, RunConfig
from otel_kzt.demo.view import Scrape, agents_reporting, frame, parse, render
from otel_kzt.errors import ConfigError, KztError

log = logging.getLogger(__name__)

ONCE_DEFAULT_DURATION_S = 20.0
CLEAR = "\x1b[H\x1b[2J"


class _Stop(Exception):
    """Raised by the SIGTERM/SIGHUP handler so that clean-up runs as for Ctrl-C."""


# Defaults in one place; every key is also a YAML key of `--config` (flags win over the file).
DEFAULTS: Final[dict[str, Any]] = {
    "zones": 3, "nodes_per_zone": 2, "interval": "2s", "duration": None, "once": False, "speed": 1.0,
    "top": 10, "metrics_port": 9464, "otlp_port": 4317, "prefix": "kzd", "net_id": 201, "style": "gke",
}


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
    cfg = RunConfig(prefix=v["prefix"], net_id=_int(v, "net_id", 1, 250), zones=zones,
                    nodes_per_zone=per_zone, interval_s=interval, grpc_port=_int(v, "otlp_port", 1, 65535),
                    metrics_port=_int(v, "metrics_port", 1, 65535), speed=float(speed), style=style)
    return DemoConfig(run=cfg, duration_s=duration, once=bool(v["once"]), top=_int(v, "top", 1, 1000))


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _title(run: ClusterRun, started: float, duration: float | None, scrape: Scrape) -> str:
    c = run.cluster
    left = f", {max(0.0, duration - (time.monotonic() - started)):.0f}s left" if duration else ""
    # An agent is "reporting" when the enricher heard from it within three intervals.
    reporting = agents_reporting(scrape, time.time(), 3 * run.config.interval_s + 1.0)
    return (f"otel-kzt demo: {len(c.zones())} zones x {len(c.nodes) // len(c.zones())} nodes, "
            f"{len(c.pods)} pods, agents reporting {reporting}/{len(c.nodes)}, "
            f"up {time.monotonic() - started:.0f}s{left} (Ctrl-C to stop)")


class _Viewer:
    """Scrapes the enricher each interval, draws the live view, and keeps the first and last good scrape."""

    def __init__(self, run: ClusterRun, demo: DemoConfig) -> None:
        self.run, self.demo = run, demo
        self.first = self.last = parse(run.scrape(), time.monotonic())

    def scrape(self) -> Scrape:
        """A fresh scrape; a failed one (the enricher busy or restarting) keeps the last good one."""
        try:
            self.last = parse(self.run.scrape(), time.monotonic())
        except OSError as exc:
            enricher = self.run.enricher
            if enricher is None or enricher.poll() is not None:
                raise KztError(f"the enricher stopped; its log is in {self.run.workdir}") from exc
            log.warning("scrape failed, keeping the last one: url=%s error=%s", self.run.metrics_url, exc)
        return self.last

    def loop(self) -> None:
        started, duration = self.first.taken, self.demo.duration_s
        prev = self.first
        while duration is None or time.monotonic() - started < duration:
            wait = self.run.config.interval_s
            if duration is not None:
                wait = min(wait, max(0.0, duration - (time.monotonic() - started)))
            time.sleep(wait)
            cur = self.scrape()
            if not self.demo.once and cur is not prev:
                text = render(frame(prev, cur, self.demo.top), self.run.metrics_url,
                              _title(self.run, started, duration, cur))
                sys.stdout.write((CLEAR if sys.stdout.isatty() else "\n") + text + "\n")
                sys.stdout.flush()
            prev = cur

    def report(self) -> str:
        first, last = self.first, self.last
        return render(frame(first, last, self.demo.top), self.run.metrics_url,
                      f"otel-kzt demo: final report over {last.taken - first.taken:.0f}s "
                      "(rates are averages over the whole run)")


def run(args: argparse.Namespace) -> int:
    demo = config_from(args)
    cluster_run = ClusterRun(demo.run)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        log.info("starting: %d nodes, enricher on %s, logs in %s", len(cluster_run.cluster.nodes),
                 cluster_run.metrics_url, cluster_run.workdir)
        cluster_run.start(traffic=False)
        viewer = _Viewer(cluster_run, demo)  # the baseline, before any traffic
        cluster_run.start_traffic()
        try:
            viewer.loop()
        except (KeyboardInterrupt, _Stop):
            log.info("stopping")
            viewer.scrape()
        engine = cluster_run.engine
        if engine is not None:
            log.info("traffic: requests ok=%d failed=%d", engine.requests_ok, engine.requests_failed)
        sys.stdout.write("\n" + viewer.report() + "\n")
        return 0
    finally:
        try:
            cluster_run.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
