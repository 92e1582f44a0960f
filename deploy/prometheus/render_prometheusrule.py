#!/usr/bin/env python3
"""Render deploy/prometheusrule.yaml (Prometheus Operator) from deploy/prometheus/rules.yaml, the one source.

Usage: python deploy/prometheus/render_prometheusrule.py [--check]
`--check` exits 1 when the committed file differs from what would be rendered (the test suite does the
same through `render()`), so the two can never drift.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository's deploy/

from deploy.generated import write_or_check

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yaml"
TARGET = HERE.parent / "prometheusrule.yaml"
HEADER = (
    "# GENERATED from deploy/prometheus/rules.yaml by deploy/prometheus/render_prometheusrule.py: edit the\n"
    "# source and re-render; tests fail when the two differ.\n"
)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as `|` blocks, so the output stays readable and diffable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def prometheus_rule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "otel-kzt",
            "namespace": "otel-kzt",
            "labels": {"app.kubernetes.io/name": "otel-kzt", "app.kubernetes.io/part-of": "otel-kzt"},
        },
        "spec": {"groups": groups},
    }


def render(rules_path: Path = RULES) -> str:
    groups = yaml.safe_load(rules_path.read_text())["groups"]
    body = yaml.dump(prometheus_rule(groups), Dumper=_BlockDumper, sort_keys=False, width=110)
    return HEADER + body


def main(argv: list[str]) -> int:
    return write_or_check(TARGET, render(), argv, Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
