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
