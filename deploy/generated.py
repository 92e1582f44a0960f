"""A generated file under deploy/: written by its generator, or (`--check`) compared with what the generator
would write, exit status 1 when stale. One rule for every generator (the dashboard, the PrometheusRule);
the test suite compares through each generator's `render()` as well, so the two can never drift.
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(target: Path, text: str, argv: list[str], generator: str) -> int:
    """Write `text` to `target`, or with `--check` in `argv` only say whether it is current."""
    if "--check" in argv:
        if target.read_text() != text:
            sys.stderr.write(f"{target} is stale: run {generator}\n")
            return 1
        return 0
    target.write_text(text)
    return 0
