"""The guards of an HTTP port, with their defaults, and listen addresses (configs import this: no server
code here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from otel_kzt.errors import ConfigError

DEFAULT_MAX_CONNECTIONS: Final = 4096
DEFAULT_HEADER_TIMEOUT_S: Final = 30.0
DEFAULT_BODY_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    lingering_s: float = 10.0


def split_host_port(value: str, name: str) -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` -> (host, port); port 0 picks a free port (tests)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(name, f"expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port_text)
