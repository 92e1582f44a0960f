"""docs/design.md is the contract (README links it): every Prometheus name it gives (`kzt_*` metrics and
labels, kubezonnet's metric) is one otel_kzt/schema.py defines, and every alert it names is a rule in
deploy/prometheus/rules.yaml. A rename in one place without the other fails here."""

from __future__ import annotations

import re

import yaml

from otel_kzt import schema
from tests.conftest import REPO

DESIGN = (REPO / "docs" / "design.md").read_text()


def _schema_names() -> set[str]:
    values = {v for v in vars(schema).values() if isinstance(v, str)}
    return values | {schema.prom_label(v) for v in values}


def test_every_prometheus_name_of_the_design_is_the_schemas() -> None:
    named = set(re.findall(r"\b(kzt_[a-z_]+|pod_cross_zone_network_traffic_bytes_total)\b", DESIGN))
    assert len(named) >= 15, named  # the design names the agents', the enricher's and the savings' series
    known = _schema_names()
    unknown = sorted(n for n in named if n not in known and n.removesuffix("_total") not in known)
    assert unknown == []


def test_every_alert_of_the_design_is_a_shipped_rule() -> None:
    named = set(re.findall(r"\bKzt[A-Z][A-Za-z]+\b", DESIGN))
    assert named, "the design names the agents' alerts"
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yaml").read_text())
    shipped = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    assert sorted(named - shipped) == []


def test_every_name_the_enricher_exposes_is_documented() -> None:
    """The other way round: each family on the enricher's /metrics (the schema's one list, which
    test_enricher_metrics checks against a running enricher) is named in the design or deploy/README.md."""
    docs = DESIGN + (REPO / "deploy" / "README.md").read_text() + (REPO / "README.md").read_text()
    names = {f"{c}_total" for c in schema.ENRICHER_PROM_COUNTERS} | set(schema.ENRICHER_PROM_GAUGES)
    assert sorted(n for n in names if not re.search(rf"\b{n}\b", docs)) == []
