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
from types import FrameType

from otel_kzt.configfile import parse_duration
from otel_kzt.demo.runner import ClusterRun, RunConfig
from otel_kzt.demo.view import Scrape, frame, parse, render
from otel_kzt.errors import ConfigError

log = logging.getLogger(__name__)

ONCE_DEFAULT_DURATION_S = 20.0
CLEAR = "\x1b[H\x1b[2J"


class _Stop(Exception):
    """Raised by the SIGTERM/SIGHUP handler so that clean-up runs as for Ctrl-C."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zones", type=int, default=3, help="availability zones (default 3)")
    parser.add_argument("--nodes-per-zone", type=int, default=2, help="nodes in each zone (default 2)")
    parser.add_argument("--interval", default="2s", help="agent export and view refresh interval (2s)")
    parser.add_argument("--duration", default=None, help="stop after this long (default: until Ctrl-C; "
                        f"{ONCE_DEFAULT_DURATION_S:.0f}s with --once)")
    parser.add_argument("--once", action="store_true",
                        help="no live view: run, print one final report, exit 0")
    parser.add_argument("--speed", type=float, default=1.0, help="traffic rate multiplier (default 1.0)")
    parser.add_argument("--top", type=int, default=10, help="talkers shown (default 10)")
    parser.add_argument("--metrics-port", type=int, default=9464, help="enricher /metrics port (9464)")
    parser.add_argument("--otlp-port", type=int, default=4317, help="enricher OTLP/gRPC port (4317)")
    # For the end-to-end tests and parallel runs: namespace prefix and address plan id.
    parser.add_argument("--prefix", default="kzd", help=argparse.SUPPRESS)
    parser.add_argument("--net-id", type=int, default=201, help=argparse.SUPPRESS)


def config_from(args: argparse.Namespace) -> tuple[RunConfig, float | None]:
    """The run config and the duration (None: until interrupted); bad values name their flag."""
    if not 1 <= args.zones <= 26:
        raise ConfigError("--zones", f"must be within 1..26, got {args.zones}")
    if args.nodes_per_zone < 1 or args.zones * args.nodes_per_zone > 100:
        raise ConfigError("--nodes-per-zone", "must be at least 1, and at most 100 nodes in all")
    if not args.speed > 0:
        raise ConfigError("--speed", f"must be positive, got {args.speed}")
    if not 1 <= args.net_id <= 250:
        raise ConfigError("--net-id", f"must be within 1..250, got {args.net_id}")
    interval = parse_duration(args.interval, "--interval")
    if interval < 0.2:
        raise ConfigError("--interval", "must be at least 200ms")
    duration = parse_duration(args.duration, "--duration") if args.duration is not None else None
    if duration is None and args.once:
        duration = ONCE_DEFAULT_DURATION_S
    for name in ("metrics_port", "otlp_port"):
        if not 1 <= getattr(args, name) <= 65535:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be a TCP port")
    cfg = RunConfig(prefix=args.prefix, net_id=args.net_id, zones=args.zones,
                    nodes_per_zone=args.nodes_per_zone, interval_s=interval, grpc_port=args.otlp_port,
                    metrics_port=args.metrics_port, speed=args.speed)
    return cfg, duration


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _title(run: ClusterRun, started: float, duration: float | None) -> str:
    c = run.cluster
    left = f", {max(0.0, duration - (time.monotonic() - started)):.0f}s left" if duration else ""
    return (f"otel-kzt demo: {len(c.zones())} zones x {len(c.nodes) // len(c.zones())} nodes, "
            f"{len(c.pods)} pods, up {time.monotonic() - started:.0f}s{left} (Ctrl-C to stop)")


def _loop(run: ClusterRun, args: argparse.Namespace, duration: float | None, first: Scrape) -> Scrape:
    started = first.taken
    prev = last = first
    live = not args.once
    while duration is None or time.monotonic() - started < duration:
        wait = run.config.interval_s
        if duration is not None:
            wait = min(wait, max(0.0, duration - (time.monotonic() - started)))
        time.sleep(wait)
        last = parse(run.scrape(), time.monotonic())
        if live:
            text = render(frame(prev, last, args.top), run.metrics_url, _title(run, started, duration))
            sys.stdout.write((CLEAR if sys.stdout.isatty() else "\n") + text + "\n")
            sys.stdout.flush()
        prev = last
    return last


def run(args: argparse.Namespace) -> int:
    cfg, duration = config_from(args)
    cluster_run = ClusterRun(cfg)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        log.info("starting: %d nodes, enricher on %s, logs in %s", len(cluster_run.cluster.nodes),
                 cluster_run.metrics_url, cluster_run.workdir)
        cluster_run.start(traffic=False)
        first = parse(cluster_run.scrape(), time.monotonic())
        cluster_run.start_traffic()
        try:
            last = _loop(cluster_run, args, duration, first)
        except (KeyboardInterrupt, _Stop):
            log.info("stopping")
            last = parse(cluster_run.scrape(), time.monotonic())
        engine = cluster_run.engine
        if engine is not None:
            log.info("traffic: requests ok=%d failed=%d", engine.requests_ok, engine.requests_failed)
        report = render(frame(first, last, args.top), cluster_run.metrics_url,
                        f"otel-kzt demo: final report over {last.taken - first.taken:.0f}s "
                        "(rates are averages over the whole run)")
        sys.stdout.write("\n" + report + "\n")
        return 0
    finally:
        try:
            cluster_run.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
