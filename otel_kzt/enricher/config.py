"""Configuration of the enricher: one frozen dataclass, defaults in one place, validation in one place.

Every field has a YAML twin (the same name with `-` instead of `_` is not accepted: YAML keys are the field
names) and most have a flag (see command.py); flags win over the file.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from otel_kzt import logformat, schema
from otel_kzt.configfile import check_keys, parse_duration
from otel_kzt.errors import ConfigError
from otel_kzt.serving.limits import (  # one place for the HTTP guards' defaults
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    split_host_port,
)

PROTOCOL_GRPC: Final = "grpc"
PROTOCOL_HTTP: Final = "http/protobuf"
PROTOCOLS: Final = (PROTOCOL_GRPC, PROTOCOL_HTTP)

DEFAULT_GRPC_ENDPOINT: Final = "0.0.0.0:4317"
DEFAULT_HTTP_ENDPOINT: Final = "0.0.0.0:4318"
DEFAULT_METRICS_ENDPOINT: Final = "0.0.0.0:9464"
DEFAULT_MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_INFLIGHT: Final = 16
DEFAULT_MAX_INFLIGHT_BYTES: Final = 256 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_CALLS: Final = 64
DEFAULT_GRPC_WORKERS: Final = 8  # threads decoding and enriching gRPC calls; admitted calls beyond wait
DEFAULT_MAX_SERIES: Final = 200_000
DEFAULT_SERIES_TTL_S: Final = 600.0
DEFAULT_EXPORT_QUEUE: Final = 5000  # queued request pieces (one per resource) per exporter
DEFAULT_EXPORT_QUEUE_BYTES: Final = 128 * 1024 * 1024
DEFAULT_EXPORT_CONSUMERS: Final = 4
DEFAULT_EXPORT_BATCH_BYTES: Final = 2 * 1024 * 1024  # below the 4 MiB a gRPC receiver takes by default
DEFAULT_EXPORT_BATCH_LINGER_S: Final = 0.2  # as the Collector's batch processor's timeout
DEFAULT_EXPORT_TIMEOUT_S: Final = 10.0
DEFAULT_EXPORT_MAX_ELAPSED_S: Final = 60.0
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 10.0
DEFAULT_PROVIDER: Final = "aws"
DEFAULT_CHECKPOINT_INTERVAL_S: Final = 5.0  # /metrics shows what is on disk: at most this far behind
DEFAULT_SERIES_LATENESS_S: Final = 3600.0  # runs and tombstones kept (counting rule, DESIGN §4)
DEFAULT_AGENT_INTERVAL_S: Final = 10.0  # the agents' --interval default
MIN_TTL_INTERVALS: Final = 3  # a series must outlive this many agent intervals without a report
DEFAULT_SAVINGS_WINDOW_S: Final = 3600.0  # DESIGN §4: savings at the traffic rate of the last hour
KNOWN_FLOW_LABELS: Final = frozenset(
    {
        schema.SOURCE_ADDRESS,
        schema.DESTINATION_ADDRESS,
        schema.SOURCE_PORT,
        schema.DESTINATION_PORT,
        schema.NETWORK_TYPE,
        schema.NETWORK_TRANSPORT,
        schema.TRAFFIC_CLASS,
        *(
            schema.end_attr(end, s)
            for end in (schema.SOURCE, schema.DESTINATION)
            for s in schema.END_SUFFIXES
        ),
    }
)


@dataclass(frozen=True)
class ExporterConfig:
    """One downstream OTLP endpoint with its own queue, retries and headers."""

    endpoint: str
    protocol: str = PROTOCOL_GRPC
    headers: tuple[tuple[str, str], ...] = ()
    queue_size: int = DEFAULT_EXPORT_QUEUE
    queue_bytes: int = DEFAULT_EXPORT_QUEUE_BYTES
    consumers: int = DEFAULT_EXPORT_CONSUMERS  # senders at once; one series always goes through the same one
    batch_bytes: int = DEFAULT_EXPORT_BATCH_BYTES  # what is queued is sent together, up to this size
    batch_linger_s: float = DEFAULT_EXPORT_BATCH_LINGER_S  # how long a batch may wait to fill up
    timeout_s: float = DEFAULT_EXPORT_TIMEOUT_S
    max_elapsed_s: float = DEFAULT_EXPORT_MAX_ELAPSED_S
    insecure: bool = True  # plain-text gRPC unless the URL is https://


@dataclass(frozen=True)
class EnricherConfig:
    grpc_endpoint: str = DEFAULT_GRPC_ENDPOINT  # "" disables the receiver
    http_endpoint: str = DEFAULT_HTTP_ENDPOINT
    metrics_endpoint: str = DEFAULT_METRICS_ENDPOINT
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_inflight_requests: int = DEFAULT_MAX_INFLIGHT
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES  # request bytes held by the receivers at once
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # per HTTP port
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS  # gRPC calls at once
    grpc_workers: int = DEFAULT_GRPC_WORKERS  # gRPC calls served at once (the others admitted wait)
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # request head (and keep-alive idle) deadline
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # whole-body deadline
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    bearer_token: str | None = None
    bearer_token_file: str | None = None  # re-read when it changes (keeps the token out of `ps`)
    exporters: tuple[ExporterConfig, ...] = ()
    kube_metadata: str | None = None
    kubeconfig: str | None = None
    cluster_cidrs: tuple[str, ...] = ()
    max_series: int = DEFAULT_MAX_SERIES
    series_ttl_s: float = DEFAULT_SERIES_TTL_S
    series_lateness_s: float = DEFAULT_SERIES_LATENESS_S  # >= series_ttl: late runs, tombstones
    max_tombstones: int = DEFAULT_MAX_SERIES  # forgotten series remembered (0: none)
    agent_interval_s: float = DEFAULT_AGENT_INTERVAL_S  # the longest interval the agents report at
    flow_aggregation: tuple[str, ...] = schema.DEFAULT_FLOW_AGGREGATION
    prices_file: str | None = None  # None: the built-in table (config/prices.yaml's twin)
    default_provider: str = DEFAULT_PROVIDER
    flow_logs_stdout: bool = True
    flow_logs_otlp: bool = True
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    state_file: str | None = None  # None: no checkpoint, a restart starts the counters from zero
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S
    savings_window_s: float = DEFAULT_SAVINGS_WINDOW_S
    log_format: str = logformat.TEXT

    def validate(self) -> EnricherConfig:
        """Raise ConfigError naming the first bad field; return self for chaining."""
        for name in ("grpc_endpoint", "http_endpoint", "metrics_endpoint"):
            value = getattr(self, name)
            if value:
                split_host_port(value, name)
        _positive(self.max_request_bytes, "max_request_bytes")
        _positive(self.max_inflight_requests, "max_inflight_requests")
        _positive(self.max_series, "max_series")
        if self.log_format not in logformat.FORMATS:
            raise ConfigError("log_format", f"must be one of {', '.join(logformat.FORMATS)}")
        if not self.savings_window_s >= 1.0:
            raise ConfigError("savings_window", f"must be at least 1s, got {self.savings_window_s!r}")
        for name in ("max_inflight_bytes", "max_connections", "max_concurrent_calls", "grpc_workers"):
            _positive(getattr(self, name), name)
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ConfigError(
                "max_inflight_bytes",
                f"{self.max_inflight_bytes} is below max_request_bytes={self.max_request_bytes}: "
                "the largest request could never be admitted",
            )
        self._check_durations()
        self._check_counting()
        self._check_ports()
        if self.bearer_token is not None and self.bearer_token_file is not None:
            raise ConfigError("bearer_token_file", "give bearer_token or bearer_token_file, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file", "tls_cert_file and tls_key_file go together")
        for cidr in self.cluster_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError("cluster_cidrs", f"not a CIDR: {cidr!r}") from exc
        for attr in self.flow_aggregation:
            if attr not in KNOWN_FLOW_LABELS:
                raise ConfigError("flow_aggregation", f"unknown attribute {attr!r}")
        for i, exp in enumerate(self.exporters):
            where = f"exporters[{i}]"
            if exp.protocol not in PROTOCOLS:
                raise ConfigError(f"{where}.protocol", f"expected one of {', '.join(PROTOCOLS)}")
            if not exp.endpoint.startswith(("http://", "https://")) and exp.protocol == PROTOCOL_HTTP:
                raise ConfigError(
                    f"{where}.endpoint", f"an http/protobuf endpoint is a URL: {exp.endpoint!r}"
                )
            for name in ("queue_size", "queue_bytes", "consumers", "batch_bytes"):
                _positive(getattr(exp, name), f"{where}.{name}")
            for name in ("timeout", "max_elapsed"):
                _positive_duration(getattr(exp, f"{name}_s"), f"{where}.{name}")
        return self

    def _check_durations(self) -> None:
        for attr, key in _DURATIONS.items():
            _positive_duration(getattr(self, attr), key)

    def _check_counting(self) -> None:
        """The counting rule's bounds (DESIGN §4) fit together."""
        least = MIN_TTL_INTERVALS * self.agent_interval_s
        if self.series_ttl_s < least:
            raise ConfigError(
                "series_ttl",
                f"{self.series_ttl_s:g}s is less than {MIN_TTL_INTERVALS} agent intervals ({least:g}s, "
                f"agent_interval {self.agent_interval_s:g}s): live series would be forgotten between reports",
            )
        if self.series_lateness_s < self.series_ttl_s:
            raise ConfigError(
                "series_lateness",
                f"{self.series_lateness_s:g}s is below series_ttl ({self.series_ttl_s:g}s): a forgotten "
                "series' return must still be recognised",
            )
        if isinstance(self.max_tombstones, bool) or not isinstance(self.max_tombstones, int):
            raise ConfigError("max_tombstones", f"must be an integer, got {self.max_tombstones!r}")
        if self.max_tombstones < 0:
            raise ConfigError("max_tombstones", f"must not be negative, got {self.max_tombstones}")

    def _check_ports(self) -> None:
        """Two listeners on one fixed port could never both start."""
        seen: dict[int, str] = {}
        for name in ("grpc_endpoint", "http_endpoint", "metrics_endpoint"):
            value = getattr(self, name)
            port = split_host_port(value, name)[1] if value else 0
            if port and port in seen:
                raise ConfigError(name, f"port {port} is also {seen[port]}'s")
            seen.setdefault(port, name)


def default_config() -> EnricherConfig:
    return EnricherConfig()


def _positive_duration(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(name, f"must be a positive duration, got {value!r}")


def _positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


_DURATIONS: Final = {
    "series_ttl_s": "series_ttl",
    "series_lateness_s": "series_lateness",
    "agent_interval_s": "agent_interval",
    "shutdown_timeout_s": "shutdown_timeout",
    "checkpoint_interval_s": "checkpoint_interval",
    "savings_window_s": "savings_window",
    "header_timeout_s": "header_timeout",
    "body_timeout_s": "body_timeout",
}


def from_mapping(data: Mapping[str, Any], base: EnricherConfig | None = None) -> EnricherConfig:
    """Build a config from YAML keys (durations as `series_ttl: 10m`, exporters as a list of mappings)."""
    base = base or default_config()
    allowed = {f.name for f in fields(EnricherConfig)} - set(_DURATIONS) | set(_DURATIONS.values())
    check_keys(data, allowed, "")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key in _DURATIONS.values():
            attr = next(a for a, y in _DURATIONS.items() if y == key)
            values[attr] = parse_duration(raw, key)
        elif key == "exporters":
            values[key] = tuple(_exporter(e, f"exporters[{i}]") for i, e in enumerate(raw or ()))
        elif key in ("cluster_cidrs", "flow_aggregation"):
            if not isinstance(raw, list | tuple):
                raise ConfigError(key, "expected a list")
            values[key] = tuple(str(v) for v in raw)
        else:
            values[key] = _typed(key, raw)
    return replace(base, **values)


def _typed(key: str, raw: Any) -> Any:
    """Check a scalar YAML value against the dataclass default's type."""
    default = getattr(default_config(), key)
    if raw is None:
        return None
    if isinstance(default, bool) or key.startswith("flow_logs"):
        if not isinstance(raw, bool):
            raise ConfigError(key, f"expected true or false, got {raw!r}")
        return raw
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(key, f"expected an integer, got {raw!r}")
        return raw
    if not isinstance(raw, str | int):
        raise ConfigError(key, f"expected a string, got {raw!r}")
    return str(raw)


def _exporter(raw: Any, where: str) -> ExporterConfig:
    if isinstance(raw, str):
        return ExporterConfig(endpoint=raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "expected a URL or a mapping with `endpoint`")
    sizes = {"queue_size", "queue_bytes", "consumers", "batch_bytes"}
    allowed = {
        "endpoint",
        "protocol",
        "headers",
        "timeout",
        "max_elapsed",
        "insecure",
        "batch_linger",
        *sizes,
    }
    check_keys(raw, allowed, where)
    if "endpoint" not in raw:
        raise ConfigError(f"{where}.endpoint", "required")
    headers = raw.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"{where}.headers", "expected a mapping of header: value")
    return ExporterConfig(
        endpoint=str(raw["endpoint"]),
        protocol=str(raw.get("protocol", PROTOCOL_GRPC)),
        headers=tuple((str(k).lower(), str(v)) for k, v in headers.items()),
        **{name: raw[name] for name in sizes if name in raw},
        timeout_s=parse_duration(raw.get("timeout", DEFAULT_EXPORT_TIMEOUT_S), f"{where}.timeout"),
        max_elapsed_s=parse_duration(
            raw.get("max_elapsed", DEFAULT_EXPORT_MAX_ELAPSED_S), f"{where}.max_elapsed"
        ),
        insecure=bool(raw.get("insecure", True)),
        batch_linger_s=parse_duration(
            raw.get("batch_linger", DEFAULT_EXPORT_BATCH_LINGER_S), f"{where}.batch_linger"
        ),
    )
