"""Loading deploy/ for the deployment tests: every Kubernetes object, by file, kind and name."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIG = REPO / "config"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
RULES = DEPLOY / "prometheus" / "rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "otel-kzt.json"

Obj = dict[str, Any]


def manifest_files() -> list[Path]:
    """Every top-level YAML in deploy/ that holds Kubernetes objects (the kustomization is not one)."""
    return sorted(p for p in DEPLOY.glob("*.yaml") if p != KUSTOMIZATION)


@functools.cache
def _load(path: Path) -> tuple[Obj, ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def objects(path: Path | None = None) -> list[Obj]:
    paths = [path] if path is not None else manifest_files()
    return [obj for p in paths for obj in _load(p)]


def get(kind: str, name: str) -> Obj:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(kind: str) -> list[Obj]:
    return [o for o in objects() if o["kind"] == kind]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: Obj) -> Iterator[Obj]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(workload: Obj, name: str) -> Obj:
    found = [c for c in all_containers(workload) if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


# --- PromQL names, derived from otel_kzt.schema ------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "e",
    }
)


def promql_labels(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    labels = set(_MATCHER_LABEL.findall(expr))
    for group in _GROUPING.findall(expr):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    return labels


def promql_metrics(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression reads."""
    text = _GROUPING.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", _STRING.sub('""', text))
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    return {
        m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS and not re.fullmatch(r"[\d.e+]+", m)
    }


def known_metrics() -> set[str]:
    """Every Prometheus name the enricher exposes: the schema's one list (counters get `_total`), which
    test_enricher_metrics checks against a running enricher's /metrics both ways."""
    from otel_kzt import schema

    return {f"{c}_total" for c in schema.ENRICHER_PROM_COUNTERS} | set(schema.ENRICHER_PROM_GAUGES) | {"up"}


def known_labels() -> set[str]:
    """Every label those metrics carry (default flow aggregation), plus Prometheus' own target labels."""
    from otel_kzt import schema

    return set(schema.ENRICHER_PROM_LABELS) | {"job", "instance"}


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of the Grafana dashboard, template variables included."""
    import json

    board = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t) for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            out.append(
                (f"${var['name']}", {"expr": var["definition"], "instant": True, "refId": var["name"]})
            )
    return out


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`384Mi`, `1Gi`, `512M`, plain bytes) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix) and quantity[: -len(suffix)].isdigit():
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def memory_limit(kind: str, name: str, container_name: str) -> int:
    return memory_bytes(container(get(kind, name), container_name)["resources"]["limits"]["memory"])


def rss_bytes(pid: int, field: str = "VmHWM") -> int:
    """A process' peak (VmHWM, what a memory limit is measured against) or current (VmRSS) resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")
