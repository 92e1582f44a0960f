// Sends kzt.flow.bytes / kzt.flow.packets cumulative sums through one of the OpenTelemetry JS OTLP metric
// exporters, as a Node.js service instrumented with the OpenTelemetry SDK would: one export per interval.
//   node send.js PROTOCOL URL COMPRESSION VALUE_TYPE NODE_NAME
//   PROTOCOL: grpc | http-json | http-proto; COMPRESSION: none | gzip; VALUE_TYPE: int | double
//   (observable counters are doubles unless told otherwise; the agent sends integers).
// Each line on stdin is one interval: [[attributes, bytes, packets], ...], the flows' cumulative values;
// the reader collects them (and a kzt.agent.flows.tracked gauge) and exports once (forceFlush), then the
// line `ok` (or `failed: <error>`) is written to stdout. At the end of stdin the provider shuts down.
// Headers (the bearer token) come from OTEL_EXPORTER_OTLP_HEADERS, as for any OTLP exporter.
// Exit 0 when every export succeeded, 1 otherwise.
"use strict";

const readline = require("node:readline");
const { ValueType } = require("@opentelemetry/api");
const { MeterProvider, PeriodicExportingMetricReader } = require("@opentelemetry/sdk-metrics");
const { resourceFromAttributes } = require("@opentelemetry/resources");

const EXPORTERS = {
  grpc: () => require("@opentelemetry/exporter-metrics-otlp-grpc").OTLPMetricExporter,
  "http-json": () => require("@opentelemetry/exporter-metrics-otlp-http").OTLPMetricExporter,
  "http-proto": () => require("@opentelemetry/exporter-metrics-otlp-proto").OTLPMetricExporter,
};
const METRICS = [
  ["kzt.flow.bytes", "By", 1],
  ["kzt.flow.packets", "{packet}", 2],
];

async function main() {
  const [protocol, url, compression, valueType, node] = process.argv.slice(2);
  const Exporter = EXPORTERS[protocol]();
  const exporter = new Exporter({ url, compression, timeoutMillis: 10000 });
  let failure = null;
  const original = exporter.export.bind(exporter);
  exporter.export = (metrics, done) =>
    original(metrics, (result) => {
      if (result.code !== 0) failure = result.error || new Error(`export result ${result.code}`);
      done(result);
    });
  const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 3600000 });
  const provider = new MeterProvider({
    resource: resourceFromAttributes({ "service.name": "otel-kzt-agent", "k8s.node.name": node }),
    readers: [reader],
  });
  const meter = provider.getMeter("otel_kzt.js_client", "1.4.2", {
    schemaUrl: "https://opentelemetry.io/schemas/1.26.0",
  });
  let flows = [];
  const type = valueType === "int" ? ValueType.INT : ValueType.DOUBLE;
  for (const [name, unit, column] of METRICS) {
    meter
      .createObservableCounter(name, { unit, valueType: type, description: `${name} of each flow` })
      .addCallback((result) => {
        for (const flow of flows) result.observe(flow[column], flow[0]);
      });
  }
  meter
    .createObservableGauge("kzt.agent.flows.tracked", { unit: "{flow}", valueType: ValueType.INT })
    .addCallback((result) => result.observe(flows.length));
  let failed = false;
  for await (const line of readline.createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    flows = JSON.parse(line);
    failure = null;
    await reader.forceFlush();
    if (failure) failed = true;
    process.stdout.write(failure ? `failed: ${failure.message || failure}\n` : "ok\n");
  }
  await provider.shutdown();
  process.exit(failed ? 1 : 0);
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
