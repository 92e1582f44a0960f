"""`otel-kzt report`: the savings report of a running enricher, or of a Prometheus holding its metrics.

A table on a terminal (plain text in a pipe), `--output json` for scripts (the layout of
`/api/v1/savings`). Exit 0 when the source was read (also when the savings are off: the report says why),
1 when it could not be.
"""

from __future__ import annotations

import argparse
import json
import sys

from otel_kzt.configfile import parse_duration
from otel_kzt.savings.jsonform import report_to_json
from otel_kzt.savings.render import render
from otel_kzt.savings.sources import DEFAULT_TIMEOUT_S, from_enricher

DEFAULT_ENRICHER = "http://127.0.0.1:9464"
OUTPUTS = ("table", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--enricher", metavar="URL", help=f"a running enricher's metrics port ({DEFAULT_ENRICHER})"
    )
    source.add_argument("--prometheus", metavar="URL", help="a Prometheus that scrapes the enricher")
    parser.add_argument("--output", choices=OUTPUTS, default="table", help="table (default) or json")
    parser.add_argument("--window", default="1h", help="with --prometheus: the window the rates cover (1h)")
    parser.add_argument("--timeout", default=f"{DEFAULT_TIMEOUT_S:.0f}s", help="per request (10s)")


def run(args: argparse.Namespace) -> int:
    timeout = parse_duration(args.timeout, "--timeout")
    if args.prometheus:
        from otel_kzt.savings.promsource import from_prometheus

        source = args.prometheus
        report = from_prometheus(source, parse_duration(args.window, "--window"), timeout)
    else:
        source = args.enricher or DEFAULT_ENRICHER
        report = from_enricher(source, timeout)
    if args.output == "json":
        sys.stdout.write(json.dumps(report_to_json(report), indent=2) + "\n")
    else:
        tty = sys.stdout.isatty()
        width = None if not tty else _terminal_width()
        sys.stdout.write(render(report, source, width=width, color=tty))
    return 0


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((140, 40)).columns
