"""The house rules that tools can check: ruff over the tree, mypy --strict over the package.

Run in the suite (not only in an editor) so that CI refuses a change that breaks them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy", "--cache-dir", "/dev/null")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_cycles_between_stages() -> None:
    """The data's path runs one way: the datapath and metadata never import the enricher or the demo."""
    offenders = []
    for path in (REPO / "otel_kzt").rglob("*.py"):
        text = path.read_text()
        stage = path.relative_to(REPO / "otel_kzt").parts[0]
        if stage in {"agent", "k8s"} and ("otel_kzt.enricher" in text or "otel_kzt.demo" in text):
            offenders.append(str(path))
        if stage == "enricher" and ("otel_kzt.agent" in text or "otel_kzt.demo" in text):
            offenders.append(str(path))
    assert offenders == []


_E = "otel_kzt.enricher."
# Inside the enricher, the pipeline's parts (receivers -> processing -> state -> exporters) and what each
# may not import: nothing below reaches up to a transport, the core or the wiring (service, command).
_ENRICHER_FORBIDDEN = {
    "receivers": (_E + "service", _E + "command", _E + "exporters.otlp"),
    "processing": (_E + "receivers", _E + "service", _E + "command", _E + "exporters.otlp"),
    "state": (
        _E + "receivers",
        _E + "service",
        _E + "command",
        _E + "exporters.otlp",
        _E + "processing.core",
        _E + "processing.points",
    ),
    "exporters": (_E + "receivers", _E + "service", _E + "command", _E + "processing.core", _E + "state"),
}


def test_enricher_parts_import_one_way() -> None:
    """The enricher's folders follow the Collector's pipeline, and its imports run one way along it."""
    root = REPO / "otel_kzt" / "enricher"
    parts = {p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert parts == set(_ENRICHER_FORBIDDEN)
    offenders = []
    for part, forbidden in _ENRICHER_FORBIDDEN.items():
        for path in (root / part).rglob("*.py"):
            imports = [
                line.split()[1]
                for line in path.read_text().splitlines()
                if line.lstrip().startswith(("from otel_kzt.", "import otel_kzt."))
            ]
            offenders += [f"{path.relative_to(REPO)}: {m}" for m in imports if m.startswith(forbidden)]
    assert offenders == []
