"""The real OpenTelemetry clients the enricher's client tests drive, one export per interval each.

`JsClient` runs tests/clients/js/send.js (the OpenTelemetry JS SDK and OTLP exporters from npm): one interval
per line on its stdin, `ok` per export on its stdout. `PythonClient` is an OpenTelemetry Python SDK
MeterProvider in this process whose reader exports once per interval (force_flush). Both send what they are
given: flows as (attributes, cumulative bytes, cumulative packets), and a kzt.agent.flows.tracked gauge.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from otel_kzt import schema

JS = Path(__file__).resolve().parents[1] / "clients" / "js"
Flow = tuple[dict[str, Any], int, int]  # attributes, cumulative bytes, cumulative packets


class JsClient:
    """tests/clients/js/send.js with one exporter (PROTOCOL, COMPRESSION, VALUE_TYPE: see there); `node` is
    its resource's k8s.node.name, `token` the bearer token it sends."""

    def __init__(
        self, protocol: str, url: str, compression: str, value_type: str, *, node: str, token: str
    ) -> None:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {token}"}
        command = [str(shutil.which("node")), "send.js", protocol, url, compression, value_type, node]
        self.name = node
        self._proc = subprocess.Popen(
            command, cwd=JS, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("exited")

    def export(self, flows: list[Flow]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(flows) + "\n")
        self._proc.stdin.flush()
        answer = self._lines.get(timeout=30)
        assert answer == "ok", f"{self.name}: {answer}"

    def close(self) -> None:
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            assert self._proc.wait(timeout=20) == 0, f"{self.name} exited {self._proc.returncode}"
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._reader.join(timeout=10)  # it has read the end of the output
            if self._proc.stdout is not None:
                self._proc.stdout.close()


class PythonClient:
    """An OpenTelemetry Python SDK MeterProvider whose reader exports once per interval (force_flush)."""

    def __init__(self, exporter: MetricExporter, node: str) -> None:
        self.name = node
        self._flows: list[Flow] = []
        self._results: list[MetricExportResult] = []
        original = exporter.export

        def export(
            metrics_data: MetricsData, timeout_millis: float = 10_000, **kw: Any
        ) -> MetricExportResult:
            result = original(metrics_data, timeout_millis=timeout_millis, **kw)
            self._results.append(result)
            return result

        exporter.export = export  # type: ignore[method-assign]
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
        resource = Resource.create(
            {schema.SERVICE_NAME: schema.AGENT_SERVICE_NAME, schema.RESOURCE_NODE_NAME: node}
        )
        self._provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self._provider.get_meter(
            "otel_kzt.py_client", "1.4.2", "https://opentelemetry.io/schemas/1.26.0", {"kzt.test": "yes"}
        )
        for metric, unit, column in ((schema.FLOW_BYTES, "By", 1), (schema.FLOW_PACKETS, "{packet}", 2)):
            meter.create_observable_counter(metric, [self._observe(column)], unit=unit, description=metric)
        meter.create_observable_gauge(
            schema.OTLP_AGENT_FLOWS_TRACKED, [lambda _o: [Observation(len(self._flows))]], unit="{flow}"
        )

    def _observe(self, column: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda _options: [Observation(flow[column], flow[0]) for flow in self._flows]

    def export(self, flows: list[Flow]) -> None:
        self._flows = flows
        assert self._provider.force_flush(10_000)
        assert self._results[-1:] == [MetricExportResult.SUCCESS], f"{self.name}: {self._results}"

    def close(self) -> None:
        self._provider.shutdown()
