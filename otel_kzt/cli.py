"""The `otel-kzt` console script: parses the command line and hands one config object on.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`; this module only wires them,
so importing it never imports bcc, gRPC servers or the kubernetes client.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from otel_kzt import __version__, logformat
from otel_kzt.errors import ConfigError, KztError

# command -> (module, help); imported lazily so `otel-kzt agent --help` does not load the enricher.
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("otel_kzt.agent.command", "node agent: eBPF flow counters -> OTLP cumulative sums"),
    "enricher": ("otel_kzt.enricher.command", "OTLP receiver that adds Kubernetes metadata and exports"),
    "demo": ("otel_kzt.demo.command", "a simulated multi-zone cluster on this machine (the default)"),
    "report": ("otel_kzt.savings.command", "savings report: what to change, what it saves, before and after"),
}
EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otel-kzt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"otel-kzt {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {*COMMANDS, "-h", "--help", "--version", "--log-level"}:
        argv = ["demo", *argv]  # the embedded default
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args([*argv, "demo"])
    logformat.configure(getattr(args, "log_format", None) or logformat.TEXT, args.log_level)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args))
    except ConfigError as exc:
        print(f"otel-kzt {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KztError as exc:
        print(f"otel-kzt {args.command}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
