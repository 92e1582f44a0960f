"""The guards of an HTTP port, with their defaults (imported by configs: no server code here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_MAX_CONNECTIONS: Final = 4096
DEFAULT_HEADER_TIMEOUT_S: Final = 30.0
DEFAULT_BODY_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    lingering_s: float = 10.0
