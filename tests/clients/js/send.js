// Sends kzt.flow.bytes / kzt.flow.packets cumulative sums once, through one of the OpenTelemetry JS OTLP
// metric exporters, as a Node.js service instrumented with the OpenTelemetry SDK would.
//   node send.js PROTOCOL URL COMPRESSION FLOWS_JSON
//   PROTOCOL: grpc | http-json | http-proto; COMPRESSION: none | gzip;
//   FLOWS_JSON: [[source address, destination address, bytes], ...]
// Headers (the bearer token) come from OTEL_EXPORTER_OTLP_HEADERS, as for any OTLP exporter.
// Exit 0 when the export succeeded, 1 with the error on stderr otherwise.
"use strict";

const { MeterProvider, PeriodicExportingMetricReader } = require("@opentelemetry/sdk-metrics");
const { resourceFromAttributes } = require("@opentelemetry/resources");

const EXPORTERS = {
  grpc: () => require("@opentelemetry/exporter-metrics-otlp-grpc").OTLPMetricExporter,
  "http-json": () => require("@opentelemetry/exporter-metrics-otlp-http").OTLPMetricExporter,
  "http-proto": () => require("@opentelemetry/exporter-metrics-otlp-proto").OTLPMetricExporter,
};

async function main() {
  const [protocol, url, compression, flowsJson] = process.argv.slice(2);
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
    resource: resourceFromAttributes({
      "service.name": "otel-kzt-agent",
      "k8s.node.name": `js-${protocol}-${compression}`,
    }),
    readers: [reader],
  });
  const meter = provider.getMeter("otel_kzt.js_client");
  const flows = JSON.parse(flowsJson);
  for (const [name, unit, scale] of [["kzt.flow.bytes", "By", 1], ["kzt.flow.packets", "{packet}", 1000]]) {
    meter.createObservableCounter(name, { unit }).addCallback((result) => {
      for (const [src, dst, value] of flows) {
        result.observe(Math.floor(value / scale), {
          "source.address": src,
          "destination.address": dst,
          "network.transport": "tcp",
          "destination.port": "443",
        });
      }
    });
  }
  await reader.forceFlush();
  await provider.shutdown();
  if (failure) {
    process.stderr.write(`export failed: ${failure.message || failure}\n`);
    process.exit(1);
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
