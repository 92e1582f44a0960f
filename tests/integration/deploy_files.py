"""Loading deploy/ for the deployment tests: every Kubernetes object, by file, kind and name."""

from __future__ import annotations

import functools
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
