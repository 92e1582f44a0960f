"""Shared configuration plumbing: durations, YAML files, and flags-over-file merging.

Each component keeps its own frozen config dataclass with `default_config()` and `validate()`; this module
only holds what they share, so every component reads durations and files the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from otel_kzt.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | float | int, field: str) -> float:
    """`500ms`, `2s`, `1m`, `1h`, or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(field, f"expected a duration such as 500ms, 2s or 1m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(field, f"expected a duration such as 500ms, 2s or 1m, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ConfigError(field, f"must not be negative, got {value!r}")
    return seconds


def load_yaml(path: str | Path, field: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a ConfigError naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(field, f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(field, f"{path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def check_keys(data: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    """Unknown keys are errors (a typo must not silently fall back to a default)."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(sorted(allowed))})")


def merge(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> dict[str, Any]:
    """Flags win over the file; a flag left at None (not given) does not override."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    return merged
