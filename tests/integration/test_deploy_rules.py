"""Prometheus rules: promtool accepts them, their unit tests pass, and those tests can fail.

`promtool test rules` runs deploy/prometheus/rules_test.yaml, where every alert fires in one case and
stays quiet in another. To prove the unit tests bite, each alert is mutated twice (never fires / always
fires) in a temporary copy, and promtool must then report a failure. Every metric and label the rules read
is one the enricher exposes (derived from otel_kzt.schema), so a renamed metric cannot leave a dead alert.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import deploy_files as df

pytestmark = pytest.mark.integration


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: run scripts/setup.sh (Debian package prometheus)"
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def _groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(df.RULES.read_text())["groups"]
    return groups


def _alerts() -> list[str]:
    return [r["alert"] for g in _groups() for r in g["rules"] if "alert" in r]


def test_promtool_check_rules() -> None:
    done = _run("check", "rules", str(df.RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in _groups())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = _run("test", "rules", df.RULES_TEST.name, cwd=df.RULES_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(df.RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
    for alert in _alerts():
        assert True in cases.get(alert, []), f"{alert}: no case where it fires"
        assert False in cases.get(alert, []), f"{alert}: no case where it stays quiet"


def test_rules_read_only_metrics_and_labels_the_enricher_exposes() -> None:
    recorded = {r["record"] for g in _groups() for r in g["rules"] if "record" in r}
    for group in _groups():
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            unknown = df.promql_metrics(rule["expr"]) - df.known_metrics() - recorded
            assert not unknown, f"{name} reads unknown metrics {unknown}"
            unknown_labels = df.promql_labels(rule["expr"]) - df.known_labels()
            assert not unknown_labels, f"{name} uses unknown labels {unknown_labels}"


def test_every_alert_has_severity_summary_and_description() -> None:
    for group in _groups():
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
                assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def _mutated_run(tmp: Path, alert: str, expr: str) -> tuple[str, str, int]:
    groups = _groups()
    for group in groups:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = expr
    work = tmp / f"{alert}-{'never' if '<' in expr else 'always'}"
    work.mkdir()
    (work / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(df.RULES_TEST, work / "rules_test.yaml")
    done = _run("test", "rules", "rules_test.yaml", cwd=work)
    return alert, expr, done.returncode


def test_unit_tests_fail_when_any_alert_is_broken(tmp_path: Path) -> None:
    # `vector(1) < 0` never fires; `vector(1)` always fires (with the wrong labels). Either must be caught.
    mutations = [(alert, expr) for alert in _alerts() for expr in ("vector(1) < 0", "vector(1)")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda m: _mutated_run(tmp_path, *m), mutations))
    survivors = [(alert, expr) for alert, expr, code in results if code == 0]
    assert not survivors, f"mutations the unit tests did not catch: {survivors}"
