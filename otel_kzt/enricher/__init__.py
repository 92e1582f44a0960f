"""The enricher, laid out as an OpenTelemetry Collector pipeline.

receivers/ (OTLP over gRPC and HTTP, decoding) -> processing/ (the enrichment core: resolution, points,
flow logs, cost) -> state/ (the series table, the counting rule, the checkpoint) -> exporters/ (OTLP
re-export, Prometheus exposition). config.py, command.py and service.py wire them together.
"""
