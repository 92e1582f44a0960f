"""The datapath modes by name (`--datapath`): each implements `mode.Mode` over the shared core."""

from __future__ import annotations

from otel_kzt.agent.datapath import netfilter
from otel_kzt.agent.datapath.mode import Mode
from otel_kzt.errors import ConfigError

MODES: dict[str, Mode] = {netfilter.MODE.name: netfilter.MODE}


def by_name(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError("datapath", f"unknown datapath {name!r} (one of {', '.join(MODES)})") from None
