"""The OpenTelemetry Collector samples in config/ hang together (`otelcol` is not installable here).

Checked structurally, as the Collector would at start-up: every pipeline names only components that are
defined, every defined component is used, component ids are `type[/name]` of the types the sample relies
on. And checked against deploy/: the load-balancing exporter resolves the enricher's headless Service on
its OTLP/gRPC port and routes by resource (one agent -> one replica), and nothing on the way to the
enricher changes temporality or folds series.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import deploy_files as df

SECTIONS = ("receivers", "processors", "exporters", "connectors", "extensions")
KNOWN_TYPES = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch"},
    "exporters": {"otlp", "otlphttp", "loadbalancing", "load_balancing", "prometheusremotewrite", "debug"},
    "extensions": {"health_check", "bearertokenauth"},
    "connectors": set(),
}
PIPELINE_ID = re.compile(r"^(metrics|logs|traces)(/[\w.-]+)?$")
# Processors that would break the enricher's input: temporality changes, or attribute edits that fold
# series into each other without adding them up.
FORBIDDEN_BEFORE_ENRICHER = {
    "cumulativetodelta",
    "deltatocumulative",
    "transform",
    "metricstransform",
    "attributes",
    "filter",
    "interval",
}


def _samples() -> list[Path]:
    return sorted(df.CONFIG.glob("collector-*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def test_there_are_samples_for_both_hops() -> None:
    names = {p.name for p in _samples()}
    assert {"collector-agent-gateway.yaml", "collector-enricher-backend.yaml"} <= names


@pytest.mark.parametrize("path", _samples(), ids=lambda p: p.name)
def test_pipelines_reference_defined_components_and_all_are_used(path: Path) -> None:
    config = _load(path)
    assert set(config) <= {*SECTIONS, "service"}
    service = config["service"]
    used: dict[str, set[str]] = {s: set() for s in SECTIONS}
    used["extensions"] = set(service.get("extensions", []))
    assert service["pipelines"], "no pipeline"
    for pipeline_id, pipeline in service["pipelines"].items():
        assert PIPELINE_ID.match(pipeline_id), pipeline_id
        assert set(pipeline) <= {"receivers", "processors", "exporters"}
        assert pipeline["receivers"] and pipeline["exporters"], pipeline_id
        for section in ("receivers", "processors", "exporters"):
            ids = pipeline.get(section, [])
            assert len(ids) == len(set(ids)), f"{pipeline_id}: duplicate {section}"
            used[section] |= set(ids)
        processors = pipeline.get("processors", [])
        if "memory_limiter" in processors:
            assert processors[0] == "memory_limiter", f"{pipeline_id}: memory_limiter must come first"
    for section in SECTIONS:
        defined = set(config.get(section) or {})
        assert used[section] <= defined, f"{section} used but not defined: {used[section] - defined}"
        assert defined <= used[section], f"{section} defined but unused: {defined - used[section]}"
        for component_id in defined:
            component_type = component_id.split("/", 1)[0]
            assert component_type in KNOWN_TYPES[section], f"{section}: unexpected type {component_type}"


def test_gateway_routes_each_agent_to_one_enricher_replica() -> None:
    config = _load(df.CONFIG / "collector-agent-gateway.yaml")
    (exporter,) = config["exporters"].values()
    assert exporter["routing_key"] == "resource"
    headless = df.get("Service", "otel-kzt-enricher-headless")
    grpc_port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "otlp-grpc")
    dns = exporter["resolver"]["dns"]
    name, namespace = headless["metadata"]["name"], headless["metadata"]["namespace"]
    assert dns["hostname"] == f"{name}.{namespace}.svc.cluster.local"
    assert int(dns["port"]) == grpc_port
    assert "otlp" in exporter["protocol"]


def test_nothing_between_agents_and_enricher_changes_temporality_or_folds_series() -> None:
    config = _load(df.CONFIG / "collector-agent-gateway.yaml")
    for pipeline in config["service"]["pipelines"].values():
        types = {p.split("/", 1)[0] for p in pipeline.get("processors", [])}
        assert not types & FORBIDDEN_BEFORE_ENRICHER


def test_backend_collector_takes_the_enrichers_metrics_and_flow_logs() -> None:
    config = _load(df.CONFIG / "collector-enricher-backend.yaml")
    pipelines = config["service"]["pipelines"]
    kinds = {pid.split("/", 1)[0] for pid in pipelines}
    assert kinds == {"metrics", "logs"}
    exporters = {e.split("/", 1)[0] for p in pipelines.values() for e in p["exporters"]}
    assert {"prometheusremotewrite", "otlphttp"} <= exporters
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc.endswith(":4317")


def test_gateway_requires_and_sends_the_token_the_manifests_mount() -> None:
    config = _load(df.CONFIG / "collector-agent-gateway.yaml")
    token = _token_path()
    extensions = config["extensions"]
    for protocol in config["receivers"]["otlp"]["protocols"].values():
        assert extensions[protocol["auth"]["authenticator"]]["filename"] == token
    (exporter,) = config["exporters"].values()
    assert extensions[exporter["protocol"]["otlp"]["auth"]["authenticator"]]["filename"] == token


def _token_path() -> str:
    """Where deploy/ mounts the token file: the agent's --otlp-bearer-token-file."""
    args = df.container(df.get("DaemonSet", "otel-kzt-agent"), "agent")["args"]
    return str(args[args.index("--otlp-bearer-token-file") + 1])
