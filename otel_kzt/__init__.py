"""otel-kzt: OpenTelemetry-native Kubernetes cross-zone network traffic monitoring.

Data path: kernel (agent/datapath/bpf/) -> agent (otel_kzt.agent) -> OTLP wire (otel_kzt.schema) -> enricher
(otel_kzt.enricher, with Kubernetes metadata from otel_kzt.k8s) -> OTLP / Prometheus / flow logs.
"""

__version__ = "0.1.0"
