"""`otel-kzt enricher`: flags (each with a YAML twin in --config), then run the service until SIGTERM."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import Any

from otel_kzt import logformat
from otel_kzt.configfile import load_yaml, merge, parse_duration
from otel_kzt.enricher.config import (
    PROTOCOL_GRPC,
    PROTOCOLS,
    EnricherConfig,
    ExporterConfig,
    default_config,
    from_mapping,
)
from otel_kzt.errors import ConfigError, KztError
from otel_kzt.signals import StopSignals

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = default_config()
    add = parser.add_argument
    add("--config", metavar="FILE", help="YAML file; every flag below has a twin key (flags win)")
    add("--log-format", choices=logformat.FORMATS, help="text (default) or json: one object a line")
    add("--grpc-endpoint", help=f"OTLP/gRPC listen address ({d.grpc_endpoint}; empty disables)")
    add("--http-endpoint", help=f"OTLP/HTTP listen address ({d.http_endpoint}; empty disables)")
    add("--metrics-endpoint", help=f"/metrics, /healthz, /readyz address ({d.metrics_endpoint})")
    add("--otlp-grpc-port", type=int, help="shorthand for --grpc-endpoint 0.0.0.0:PORT")
    add("--otlp-http-port", type=int, help="shorthand for --http-endpoint 0.0.0.0:PORT")
    add("--metrics-port", type=int, help="shorthand for --metrics-endpoint 0.0.0.0:PORT")
    add(
        "--max-request-bytes",
        type=int,
        help=f"largest accepted request, also after gunzip ({d.max_request_bytes})",
    )
    add(
        "--max-inflight-requests",
        type=int,
        help=f"requests enriched at once before 503 ({d.max_inflight_requests})",
    )
    add(
        "--max-inflight-bytes",
        type=int,
        help=f"request bytes held by both receivers at once, beyond: retry later ({d.max_inflight_bytes})",
    )
    add("--max-connections", type=int, help=f"open connections per HTTP port ({d.max_connections})")
    add("--max-concurrent-calls", type=int, help=f"gRPC calls at once ({d.max_concurrent_calls})")
    add(
        "--grpc-workers",
        type=int,
        help=f"threads serving gRPC calls, the other admitted calls wait ({d.grpc_workers})",
    )
    add("--header-timeout", help="deadline for a request head, also the keep-alive idle time (30s)")
    add("--body-timeout", help="deadline for a whole request body (60s)")
    add("--tls-cert-file", help="serve both receivers over TLS with this certificate (PEM, reloaded)")
    add("--tls-key-file", help="private key (PEM) for --tls-cert-file")
    add(
        "--bearer-token-file",
        help="require `Authorization: Bearer <file content>` on both receivers (re-read on change)",
    )
    add("--export-endpoint", action="append", metavar="URL", help="downstream OTLP endpoint (repeatable)")
    add("--export-protocol", choices=PROTOCOLS, help="protocol of the --export-endpoint URLs (grpc)")
    add("--export-header", action="append", metavar="KEY=VALUE", help="header sent to every export endpoint")
    add("--kube-metadata", metavar="FILE", help="Kubernetes List of Nodes and Pods instead of the API server")
    add("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    add("--cluster-cidr", action="append", metavar="CIDR", help="pod/service range: unknown, not external")
    add("--max-series", type=int, help=f"series tracked for /metrics ({d.max_series})")
    add("--series-ttl", help="forget series silent this long (10m; at least 3 --agent-interval)")
    add("--series-lateness", help="keep runs and forgotten series' tombstones this long (1h, >= TTL)")
    add("--max-tombstones", type=int, help=f"forgotten series remembered ({d.max_tombstones})")
    add("--agent-interval", help="the longest interval the agents report at (10s)")
    add("--flow-aggregation", metavar="ATTR,...", help="attributes kept as kzt_flow_* labels")
    add("--prices-file", metavar="FILE", help="$/GB per traffic class and provider (config/prices.yaml)")
    add("--default-provider", help=f"price table for nodes without providerID ({d.default_provider})")
    add("--flow-logs-stdout", action=argparse.BooleanOptionalAction, default=None, help="JSON flow logs")
    add("--flow-logs-otlp", action=argparse.BooleanOptionalAction, default=None, help="OTLP flow log records")
    add("--shutdown-timeout", help="deadline for flushing exporters on SIGTERM (10s)")
    add(
        "--state-file",
        metavar="FILE",
        help="checkpoint of the /metrics counters, restored at start (none: a restart resets them)",
    )
    add("--checkpoint-interval", help="how often --state-file is written, and on shutdown (5s)")
    add("--savings-window", help="savings and their evidence at the traffic rate of this last window (1h)")


def build_config(args: argparse.Namespace) -> EnricherConfig:
    """YAML file, then flags over it, then validation: one EnricherConfig or a ConfigError."""
    file_values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    config = from_mapping(file_values)
    flags = {
        "grpc_endpoint": _port_or(args.grpc_endpoint, args.otlp_grpc_port, "--otlp-grpc-port"),
        "http_endpoint": _port_or(args.http_endpoint, args.otlp_http_port, "--otlp-http-port"),
        "metrics_endpoint": _port_or(args.metrics_endpoint, args.metrics_port, "--metrics-port"),
        "max_request_bytes": args.max_request_bytes,
        "max_inflight_requests": args.max_inflight_requests,
        "max_inflight_bytes": args.max_inflight_bytes,
        "max_connections": args.max_connections,
        "max_concurrent_calls": args.max_concurrent_calls,
        "grpc_workers": args.grpc_workers,
        "header_timeout_s": _duration(args.header_timeout, "--header-timeout"),
        "body_timeout_s": _duration(args.body_timeout, "--body-timeout"),
        "tls_cert_file": args.tls_cert_file,
        "tls_key_file": args.tls_key_file,
        "bearer_token_file": args.bearer_token_file,
        "kube_metadata": args.kube_metadata,
        "kubeconfig": args.kubeconfig,
        "cluster_cidrs": tuple(args.cluster_cidr) if args.cluster_cidr else None,
        "max_series": args.max_series,
        "series_ttl_s": _duration(args.series_ttl, "--series-ttl"),
        "series_lateness_s": _duration(args.series_lateness, "--series-lateness"),
        "max_tombstones": args.max_tombstones,
        "agent_interval_s": _duration(args.agent_interval, "--agent-interval"),
        "flow_aggregation": _csv(args.flow_aggregation),
        "prices_file": args.prices_file,
        "default_provider": args.default_provider,
        "flow_logs_stdout": args.flow_logs_stdout,
        "flow_logs_otlp": args.flow_logs_otlp,
        "shutdown_timeout_s": parse_duration(args.shutdown_timeout, "--shutdown-timeout")
        if args.shutdown_timeout
        else None,
        "exporters": _exporters(args),
        "state_file": args.state_file,
        "checkpoint_interval_s": parse_duration(args.checkpoint_interval, "--checkpoint-interval")
        if args.checkpoint_interval
        else None,
        "savings_window_s": parse_duration(args.savings_window, "--savings-window")
        if args.savings_window
        else None,
        "log_format": args.log_format,
    }
    return replace(config, **merge({}, flags)).validate()


def _duration(value: str | None, flag: str) -> float | None:
    return None if value is None else parse_duration(value, flag)


def _port_or(endpoint: str | None, port: int | None, flag: str) -> str | None:
    if port is None:
        return endpoint
    if not 0 <= port <= 65535:
        raise ConfigError(flag, f"not a port: {port}")
    return f"0.0.0.0:{port}"


def _csv(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _exporters(args: argparse.Namespace) -> tuple[ExporterConfig, ...] | None:
    if not args.export_endpoint:
        if args.export_header or args.export_protocol:
            raise ConfigError("--export-endpoint", "--export-protocol/--export-header need --export-endpoint")
        return None
    headers = []
    for item in args.export_header or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--export-header", f"expected KEY=VALUE, got {item!r}")
        headers.append((key.strip().lower(), value))
    protocol = args.export_protocol or PROTOCOL_GRPC
    return tuple(ExporterConfig(e, protocol=protocol, headers=tuple(headers)) for e in args.export_endpoint)


def run(args: argparse.Namespace) -> int:
    from otel_kzt.enricher.service import EnricherService  # heavy imports only when running

    config = build_config(args)
    logformat.configure(config.log_format)
    service = EnricherService(config)
    with StopSignals() as signals:
        try:
            try:
                service.start()
            except OSError as exc:
                raise KztError(f"cannot start: {exc}") from exc
            log.info("enricher running ports=%s", service.ports)
            signals.stop.wait()
            log.info(
                "enricher stopping: receivers closed first, exporters flushed within %.1fs",
                config.shutdown_timeout_s,
            )
        finally:
            service.shutdown()  # more signals meanwhile are only recorded: nothing can interrupt this
    return 0
