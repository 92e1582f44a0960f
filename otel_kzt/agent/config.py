"""The agent's configuration: one frozen dataclass, its defaults, and the one place values are validated.

Sources, strongest first: command-line flags, the `--config` YAML file (flat keys, the flag names with `_`
for `-`), the environment (`NODE_NAME` and the standard `OTEL_EXPORTER_OTLP_{,METRICS_}*` variables; the
metrics-specific variable wins over the generic one), then the defaults below. An explicit file beats
ambient environment, as an explicit flag beats the file. Every bad value raises `ConfigError` naming the
field, so the command exits 2 with a message a person can act on.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from otel_kzt import logformat
from otel_kzt.agent.datapath.pins import DEFAULT_PIN_ROOT
from otel_kzt.configfile import check_keys, parse_duration
from otel_kzt.errors import ConfigError
from otel_kzt.serving.limits import split_host_port

GRPC: Final = "grpc"
HTTP_PROTOBUF: Final = "http/protobuf"
PROTOCOLS: Final = (GRPC, HTTP_PROTOBUF)
COMPRESSIONS: Final = ("none", "gzip")
DEFAULT_GRPC_ENDPOINT: Final = "http://localhost:4317"
DEFAULT_HTTP_ENDPOINT: Final = "http://localhost:4318"
HTTP_METRICS_PATH: Final = "/v1/metrics"
DEFAULT_INTERVAL_S: Final = 10.0
DEFAULT_IDLE_TIMEOUT_S: Final = 300.0
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_MAP_SIZE: Final = 65536
DEFAULT_EPHEMERAL: Final = (32768, 65535)
DEFAULT_OVERLAY_PORTS: Final = (4789, 8472, 6081)
DATAPATH_AUTO: Final = "auto"
DATAPATHS: Final = (DATAPATH_AUTO, "netfilter", "tc", "cgroup")  # auto first: the default
IFNAMSIZ: Final = 15  # the longest device name the kernel accepts
DEFAULT_MAX_POINTS: Final = 20_000
DEFAULT_MAX_REQUEST_BYTES: Final = 3 * 1024 * 1024  # below gRPC's default 4 MiB receive limit
DEFAULT_HEALTH_ENDPOINT: Final = "0.0.0.0:9465"  # /healthz, /readyz, /metrics; "" disables

# YAML key -> environment variables consulted when neither flag nor file sets it (first found wins).
_OTLP_ENV: Final[dict[str, tuple[str, ...]]] = {
    "otlp_endpoint": ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    "otlp_protocol": ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "otlp_headers": ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
    "otlp_compression": ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"),
    "otlp_timeout": ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
    "otlp_certificate": ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"),
    "otlp_insecure": ("OTEL_EXPORTER_OTLP_METRICS_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"),
}
KEYS: Final = frozenset(
    {
        "node_name",
        "pin",
        "pin_root",
        "interval",
        "idle_timeout",
        "map_size",
        "ephemeral_ports",
        "overlay_ports",
        "kube_metadata",
        "kubeconfig",
        "cluster_name",
        "otlp_max_points_per_request",
        "otlp_max_request_bytes",
        "log_format",
        "otlp_bearer_token_file",
        "datapath",
        "tc_devices",
        "cgroup_root",
        "health_endpoint",
        *_OTLP_ENV,
    }
)


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    endpoints: tuple[str, ...] = (DEFAULT_GRPC_ENDPOINT,)  # full URLs (HTTP: including the path)
    protocol: str = GRPC
    headers: tuple[tuple[str, str], ...] = ()
    compression: str = "none"
    timeout_s: float = DEFAULT_TIMEOUT_S
    certificate: str | None = None  # CA bundle (PEM) to verify the receiver with; re-read on change
    bearer_token_file: str | None = None  # sent as `authorization: Bearer <token>`; re-read on change
    insecure: bool = False  # gRPC endpoints without a scheme: plaintext when true
    max_points_per_request: int = DEFAULT_MAX_POINTS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node_name: str
    pin: bool = True
    pin_root: str = DEFAULT_PIN_ROOT
    interval_s: float = DEFAULT_INTERVAL_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    map_size: int = DEFAULT_MAP_SIZE
    ephemeral_ports: tuple[int, int] = DEFAULT_EPHEMERAL
    overlay_ports: tuple[int, ...] = DEFAULT_OVERLAY_PORTS
    kube_metadata: str | None = None
    kubeconfig: str | None = None
    cluster_name: str | None = None
    otlp: OtlpConfig = field(default_factory=OtlpConfig)
    log_format: str = logformat.TEXT
    datapath: str = DATAPATH_AUTO  # DATAPATHS (DESIGN §3a)
    tc_devices: tuple[str, ...] = ()  # tc: device name patterns; () = the default choice
    cgroup_root: str | None = None  # cgroup: a cgroup v2 directory; None = the host's cgroup2 mount
    health_endpoint: str = DEFAULT_HEALTH_ENDPOINT


def from_values(values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Build and validate the config from merged flag+file `values` (YAML key names), then environment."""
    check_keys(values, KEYS, "")
    env = os.environ if environ is None else environ
    v = dict(values)
    env_sourced: set[str] = set()
    for key, names in _OTLP_ENV.items():
        if v.get(key) is None:
            found = next((n for n in names if env.get(n)), None)
            if found is not None:
                v[key] = env[found]
                env_sourced.add(found)
    if v.get("node_name") is None and env.get("NODE_NAME"):
        v["node_name"] = env["NODE_NAME"]
    return _build(v, env_sourced)


def _build(v: Mapping[str, Any], env_sourced: set[str]) -> AgentConfig:
    node_name = _text(v.get("node_name"), "node_name")
    if not node_name:
        raise ConfigError("node_name", "required (--node-name or env NODE_NAME)")
    if "/" in node_name or node_name in {".", ".."}:
        raise ConfigError("node_name", f"must not contain '/': {node_name!r}")
    interval = parse_duration(v.get("interval", DEFAULT_INTERVAL_S), "interval")
    if interval <= 0:
        raise ConfigError("interval", "must be positive")
    return AgentConfig(
        node_name=node_name,
        pin=_bool(v.get("pin", True), "pin"),
        pin_root=_text(v.get("pin_root"), "pin_root") or DEFAULT_PIN_ROOT,
        interval_s=interval,
        idle_timeout_s=parse_duration(v.get("idle_timeout", DEFAULT_IDLE_TIMEOUT_S), "idle_timeout"),
        map_size=_int(v.get("map_size", DEFAULT_MAP_SIZE), "map_size", 16, 1 << 24),
        ephemeral_ports=_port_range(v.get("ephemeral_ports", DEFAULT_EPHEMERAL), "ephemeral_ports"),
        overlay_ports=_ports(v.get("overlay_ports", DEFAULT_OVERLAY_PORTS), "overlay_ports"),
        kube_metadata=_path(v.get("kube_metadata"), "kube_metadata"),
        kubeconfig=_path(v.get("kubeconfig"), "kubeconfig"),
        cluster_name=_text(v.get("cluster_name"), "cluster_name"),
        otlp=_otlp(v, env_sourced),
        log_format=_choice(v.get("log_format"), "log_format", logformat.FORMATS),
        datapath=_choice(v.get("datapath"), "datapath", DATAPATHS),
        tc_devices=_device_patterns(v.get("tc_devices")),
        cgroup_root=_text(v.get("cgroup_root"), "cgroup_root") or None,
        health_endpoint=_listen(v.get("health_endpoint"), "health_endpoint", DEFAULT_HEALTH_ENDPOINT),
    )


def _device_patterns(value: Any) -> tuple[str, ...]:
    """`--tc-devices`: names or shell patterns (`eth*`), comma separated or a YAML list."""
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    patterns = tuple(str(p).strip() for p in items if str(p).strip())
    for pattern in patterns:
        if len(pattern) > IFNAMSIZ or "/" in pattern or any(c.isspace() for c in pattern):
            raise ConfigError("tc_devices", f"{pattern!r} is not a device name or pattern")
    return patterns


def _listen(raw: Any, name: str, default: str) -> str:
    """A listen address `host:port` (checked here, split where it is bound), or "" for none."""
    value = default if raw is None else _text(raw, name) or ""
    if value:
        split_host_port(value, name)
    return value


def _choice(raw: Any, name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first when unset)."""
    value = _text(raw, name) or choices[0]
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _otlp(v: Mapping[str, Any], env_sourced: set[str]) -> OtlpConfig:
    protocol = _text(v.get("otlp_protocol"), "otlp_protocol") or GRPC
    if protocol not in PROTOCOLS:
        raise ConfigError("otlp_protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    compression = (_text(v.get("otlp_compression"), "otlp_compression") or "none").lower()
    if compression not in COMPRESSIONS:
        raise ConfigError("otlp_compression", f"must be one of {', '.join(COMPRESSIONS)}")
    timeout = v.get("otlp_timeout", DEFAULT_TIMEOUT_S)
    if {"OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"} & env_sourced:
        timeout = f"{timeout}ms"  # the OTLP variables are in milliseconds
    certificate = _path(v.get("otlp_certificate"), "otlp_certificate")
    return OtlpConfig(
        endpoints=_endpoints(v.get("otlp_endpoint"), protocol, env_sourced),
        protocol=protocol,
        headers=_headers(v.get("otlp_headers")),
        compression=compression,
        timeout_s=parse_duration(timeout, "otlp_timeout") or DEFAULT_TIMEOUT_S,
        certificate=certificate,
        # read (and re-read) by the exporter, which names the field when the file is missing
        bearer_token_file=_text(v.get("otlp_bearer_token_file"), "otlp_bearer_token_file") or None,
        insecure=_bool(v.get("otlp_insecure", False), "otlp_insecure"),
        max_points_per_request=_int(
            v.get("otlp_max_points_per_request", DEFAULT_MAX_POINTS), "otlp_max_points_per_request", 2, 10**7
        ),
        max_request_bytes=_int(
            v.get("otlp_max_request_bytes", DEFAULT_MAX_REQUEST_BYTES), "otlp_max_request_bytes", 4096, 2**30
        ),
    )


def _endpoints(value: Any, protocol: str, env_sourced: set[str]) -> tuple[str, ...]:
    """Comma-separated (or YAML list) endpoints -> full URLs; HTTP gets `/v1/metrics` per the OTLP rules."""
    if value is None:
        value = DEFAULT_GRPC_ENDPOINT if protocol == GRPC else DEFAULT_HTTP_ENDPOINT
    items = value if isinstance(value, list) else str(value).split(",")
    out = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        url = item if "://" in item else f"//{item}"
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port
        except ValueError as exc:
            raise ConfigError("otlp_endpoint", f"bad port in {item!r}") from exc
        if not parsed.hostname or parsed.scheme not in {"", "http", "https"} or port == 0:
            raise ConfigError("otlp_endpoint", f"expected [http[s]://]host[:port][/path], got {item!r}")
        if protocol == HTTP_PROTOBUF:
            if not parsed.scheme:
                raise ConfigError("otlp_endpoint", f"http/protobuf needs http:// or https://: {item!r}")
            # The generic variable is a base URL (signal path appended); a metrics-specific one is used as
            # is; a flag or YAML value gets the path only when it has none.
            generic = "OTEL_EXPORTER_OTLP_ENDPOINT" in env_sourced
            if generic or parsed.path in {"", "/"}:
                out.append(item.rstrip("/") + HTTP_METRICS_PATH)
                continue
        out.append(item)
    if not out:
        raise ConfigError("otlp_endpoint", "no endpoint given")
    return tuple(out)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in str(value).split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError("otlp_headers", f"expected key=value[,key=value], got {item!r}")
            pairs.append((urllib.parse.unquote(key.strip()), urllib.parse.unquote(val.strip())))
    return tuple((k.lower(), v) for k, v in pairs)


def _text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(name, f"expected text, got {value!r}")
    return value.strip()


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise ConfigError(name, f"expected true or false, got {value!r}")


def _int(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, f"expected an integer, got {value!r}") from exc
    if isinstance(value, bool) or not low <= number <= high:
        raise ConfigError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return number


def _port_range(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = value
    else:
        low, sep, high = str(value).partition("-")
        if not sep:
            raise ConfigError(name, f"expected LOW-HIGH such as 32768-65535, got {value!r}")
    lo, hi = _int(low, name, 1, 65535), _int(high, name, 1, 65535)
    if lo > hi:
        raise ConfigError(name, f"low end {lo} above high end {hi}")
    return lo, hi


def _ports(value: Any, name: str) -> tuple[int, ...]:
    items = value if isinstance(value, list | tuple) else [p for p in str(value).split(",") if p.strip()]
    return tuple(_int(p, name, 1, 65535) for p in items)


def _path(value: Any, name: str) -> str | None:
    text = _text(value, name)
    if not text:
        return None
    if not Path(text).is_file():
        raise ConfigError(name, f"no such file: {text}")
    return text
