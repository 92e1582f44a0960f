"""Estimated transfer cost: a $/GB price per traffic class and cloud provider.

The table is config/prices.yaml (its sources are noted there); a copy of the same defaults is built in, so
the enricher works without the file. Prices are per 1e9 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from otel_kzt.configfile import load_yaml
from otel_kzt.errors import ConfigError
from otel_kzt.schema import TrafficClass

BYTES_PER_GB: Final = 1e9

# Twin of config/prices.yaml (sources and caveats are written there).
DEFAULT_PRICES: Final[Mapping[str, Mapping[str, float]]] = {
    "aws": {"cross-zone": 0.02, "cross-region": 0.02, "external": 0.09},
    "gcp": {"cross-zone": 0.01, "cross-region": 0.02, "external": 0.12},
    "azure": {"cross-zone": 0.02, "cross-region": 0.02, "external": 0.087},
}


class PriceTable:
    def __init__(self, prices: Mapping[str, Mapping[str, float]], default_provider: str) -> None:
        if default_provider not in prices:
            raise ConfigError("default_provider", f"no prices for {default_provider!r} ({', '.join(prices)})")
        self._prices = {p: dict(table) for p, table in prices.items()}
        self._default = default_provider

    def per_byte(self, traffic_class: TrafficClass, provider: str | None) -> float:
        """Dollars per byte for this class; the default provider stands in for unknown providers."""
        table = self._prices.get(provider or self._default) or self._prices[self._default]
        return table.get(traffic_class.value, 0.0) / BYTES_PER_GB

    @property
    def default_provider(self) -> str:
        return self._default


def load_prices(path: str | Path | None, default_provider: str) -> PriceTable:
    """Read a prices YAML (provider -> class -> $/GB), or the built-in defaults when `path` is None."""
    if path is None:
        return PriceTable(DEFAULT_PRICES, default_provider)
    data = load_yaml(path, "prices_file")
    classes = {c.value for c in TrafficClass}
    prices: dict[str, dict[str, float]] = {}
    for provider, table in data.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"prices_file.{provider}", "expected a mapping of traffic class: $/GB")
        prices[str(provider)] = {
            k: _price(k, v, f"prices_file.{provider}", classes) for k, v in table.items()
        }
    return PriceTable(prices, default_provider)


def _price(key: Any, value: Any, where: str, classes: set[str]) -> float:
    if key not in classes:
        raise ConfigError(f"{where}.{key}", f"unknown traffic class (known: {', '.join(sorted(classes))})")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}.{key}", f"expected a non-negative number, got {value!r}")
    return float(value)
