// The otel-kzt web view: polls /api/v1/summary and /api/v1/savings and draws them. No build step, no
// dependencies. Totals are shown as the enricher counts them (each cell carries the exact number in
// data-bytes / data-usd); rates are the change between two polls over the time between them.
"use strict";

const REFRESH_S = Number(new URLSearchParams(location.search).get("refresh")) || 5;
const SECONDS_PER_MONTH = 730 * 3600;
let previous = null; // the last summary, for rates

function bytes(v) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return i === 0 ? `${v.toFixed(0)} ${units[i]}` : `${v.toFixed(1)} ${units[i]}`;
}

function usd(v) {
  if (v === 0) return "$0";
  return v >= 100 ? `$${v.toFixed(0)}` : v >= 0.01 ? `$${v.toFixed(2)}` : `$${v.toPrecision(2)}`;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(tableId, rows, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
  if (!rows.length) {
    const cols = document.querySelectorAll(`#${tableId} thead th`).length || 1;
    body.append(el("tr", {}, el("td", { colspan: cols, class: "empty" }, empty)));
  }
}

function workload(ns, kind, name) {
  if (kind === "Node" || !ns) return name ? `node ${name}` : "(outside the cluster)";
  return `${ns}/${name}`;
}

function rateOf(key, now, then, dt) {
  if (!then || dt <= 0) return null;
  const before = then.get(key) || 0;
  return (now >= before ? now - before : now) / dt; // a counter that went down restarted from zero
}

function index(list, keyOf, valueOf) {
  const map = new Map();
  for (const item of list) map.set(keyOf(item), valueOf(item));
  return map;
}

function drawMatrix(summary, dt) {
  const zones = [...new Set(summary.zones.flatMap(z => [z.source_zone, z.destination_zone]))].sort();
  const table = document.getElementById("zone-matrix");
  if (!zones.length) {
    table.replaceChildren(el("tbody", {}, el("tr", {}, el("td", {}, "no zone traffic yet"))));
    return;
  }
  const key = z => `${z.source_zone}\u0000${z.destination_zone}`;
  const cells = index(summary.zones, key, z => z.bytes);
  const then = previous ? index(previous.zones, key, z => z.bytes) : null;
  let max = 0;
  for (const value of cells.values()) max = Math.max(max, value);
  const head = el("tr", {}, el("th", {}, "from \\ to"), ...zones.map(z => el("th", { class: "num" }, z)));
  const rows = zones.map(src => el("tr", {}, el("th", {}, src), ...zones.map(dst => {
    const k = `${src}\u0000${dst}`;
    const value = cells.get(k) || 0;
    const rate = rateOf(k, value, then, dt);
    const heat = max > 0 ? value / max : 0;
    // Crossing cells in red, the diagonal (same zone, free) in green.
    const hue = src === dst ? 140 : 5;
    return el("td", {
      class: `cell${src === dst ? " diag" : ""}`, "data-source-zone": src, "data-destination-zone": dst,
      "data-bytes": value, style: `background: hsla(${hue}, 75%, 55%, ${(0.08 + 0.6 * heat).toFixed(3)})`,
    }, bytes(value), el("span", { class: "rate" }, rate === null ? "" : `${bytes(rate)}/s`));
  })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

function drawTalkers(summary, dt) {
  const key = t => [t.source_namespace, t.source_kind, t.source_workload, t.destination_namespace,
    t.destination_kind, t.destination_workload].join("\u0000");
  const then = previous ? index(previous.talkers, key, t => t.bytes) : null;
  fill("talkers", summary.talkers.map(t => {
    const rate = rateOf(key(t), t.bytes, then, dt);
    return el("tr", { class: "talker" },
      el("td", { class: "source" }, workload(t.source_namespace, t.source_kind, t.source_workload)),
      el("td", { class: "destination" },
        workload(t.destination_namespace, t.destination_kind, t.destination_workload)),
      el("td", { class: "num total", "data-bytes": t.bytes }, bytes(t.bytes)),
      el("td", { class: "num" }, rate === null ? "" : `${bytes(rate)}/s`));
  }), "no cross-zone traffic reported yet");
}

function drawClasses(summary, dt) {
  const then = previous ? index(previous.classes, c => c.class, c => c.usd) : null;
  fill("classes", summary.classes.map(c => {
    const rate = rateOf(c.class, c.usd, then, dt);
    return el("tr", {},
      el("td", {}, c.class),
      el("td", { class: "num", "data-bytes": c.bytes }, bytes(c.bytes)),
      el("td", { class: "num", "data-usd": c.usd }, usd(c.usd)),
      el("td", { class: "num" }, rate === null ? "" : `${usd(rate * SECONDS_PER_MONTH)}/month`));
  }), "nothing counted yet");
}

// The agents' own numbers as /metrics has them (kzt_agent_*), while each reports.
const AGENT_CELLS = [
  ["kzt_agent_flows_tracked", v => v.toFixed(0)],
  ["kzt_agent_flow_map_fill_ratio", v => `${(100 * v).toFixed(1)} %`],
  ["kzt_agent_overflow_bytes", v => bytes(v)],
  ["kzt_agent_metadata_synced", v => (v >= 1 ? "yes" : "no")],
];

function drawAgents(summary) {
  fill("agents", summary.agents.map(a => {
    const late = a.age_seconds > 3 * REFRESH_S + 30;
    const m = a.metrics || {};
    const failed = (a.exports || {}).failed || 0;
    const trouble = !a.reporting || late || failed > 0 || m.kzt_agent_metadata_synced === 0 ||
      m.kzt_agent_overflow_bytes > 0;
    const state = late || !a.reporting ? "silent" : trouble ? "degraded" : "reporting";
    const cells = AGENT_CELLS.map(([name, show]) => el("td", m[name] === undefined ? { class: "num" } :
      { class: "num", "data-node": a.node, "data-metric": name, "data-value": m[name] },
      m[name] === undefined ? "" : show(m[name])));
    const exports = Object.entries(a.exports || {}).sort().map(([result, n]) => `${result} ${n}`).join(", ");
    return el("tr", { "data-node": a.node }, el("td", {}, a.node), el("td", {}, a.datapath || ""),
      el("td", { class: "num" }, `${a.age_seconds.toFixed(0)} s ago`), ...cells,
      el("td", { class: "num", "data-node": a.node, "data-exports": JSON.stringify(a.exports || {}) }, exports),
      el("td", { class: state === "reporting" ? "ok" : "bad" }, state));
  }), "no agent has reported yet");
}

function zonesText(byZone) {
  const parts = Object.entries(byZone).sort().map(([zone, n]) => `${zone || "(no zone)"}: ${n}`);
  return parts.length ? parts.join(", ") : "none";
}

function evidence(rec) {
  const rows = rec.evidence.map(e => el("tr", {}, el("td", {}, e.direction), el("td", {}, e.client_zone),
    el("td", {}, e.server_zone), el("td", { class: "num" }, bytes(e.bytes)), el("td", { class: "num" }, usd(e.usd))));
  const table = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "direction"), el("th", {}, "client zone"),
    el("th", {}, "server zone"), el("th", { class: "num" }, "bytes"), el("th", { class: "num" }, "cost"))),
    el("tbody", {}, ...rows));
  const endpoints = Object.keys(rec.endpoints_by_zone).length
    ? el("p", {}, `ready endpoints: ${zonesText(rec.endpoints_by_zone)}`) : null;
  return el("details", {}, el("summary", {}, `${rec.evidence.length} zone pairs`), table, endpoints);
}

function drawSavings(savings) {
  const state = document.getElementById("savings-state");
  document.getElementById("savings-window").textContent =
    `(over the last ${(savings.covered_seconds / 60).toFixed(1)} of ${(savings.window_seconds / 60).toFixed(0)} min, `
    + `a month being 730 hours)`;
  state.textContent = savings.enabled ? (savings.setting ? `routing setting this cluster accepts: ${savings.setting}` : "")
    : `savings are off: ${savings.reason}`;
  state.className = savings.enabled ? "" : "bad";
  document.getElementById("headline").textContent = savings.recommendations.length
    ? `${usd(savings.usd_per_month)} / month could be saved by ${savings.recommendations.length} change(s)` : "";
  fill("recommendations", savings.recommendations.map(r => el("tr", { class: "recommendation", "data-kind": r.recommendation },
    el("td", {}, r.recommendation),
    el("td", {}, r.service ? `${r.namespace}/${r.service}` : `${r.namespace}/${r.workload}`),
    el("td", { class: "num saving", "data-usd": r.usd_per_month }, `${usd(r.usd_per_month)}/month`),
    el("td", {}, r.action), el("td", {}, evidence(r)))), savings.enabled ? "nothing to recommend yet" : "savings are off");
  fill("services", savings.services.map(s => {
    const c = s.change;
    const change = c ? `${new Date(c.at * 1000).toLocaleTimeString()}: ${c.routing_before} \u2192 ${c.routing_after}; `
      + `billed ${bytes(c.before.bytes_per_second)}/s (${usd(c.before.usd_per_month)}/month) before, `
      + `${bytes(c.after.bytes_per_second)}/s (${usd(c.after.usd_per_month)}/month) after` : "";
    return el("tr", { class: "service" }, el("td", {}, `${s.namespace}/${s.name}`), el("td", {}, s.routing),
      el("td", {}, zonesText(s.endpoints_by_zone)), el("td", { class: "num" }, `${bytes(s.bytes_per_second)}/s`),
      el("td", { class: "num" }, `${usd(s.usd_per_month)}/month`), el("td", { class: "change" }, change),
      el("td", {}, s.note));
  }), "no Service carried billed traffic in the window");
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const [summary, savings] = await Promise.all([getJson("api/v1/summary"), getJson("api/v1/savings")]);
    const dt = previous ? summary.generated_at - previous.generated_at : 0;
    drawMatrix(summary, dt);
    drawTalkers(summary, dt);
    drawClasses(summary, dt);
    drawAgents(summary);
    drawSavings(savings);
    previous = summary;
    status.textContent = `updated ${new Date(summary.generated_at * 1000).toLocaleTimeString()}, `
      + `refreshing every ${REFRESH_S} s`;
    status.className = "";
    document.body.dataset.loaded = "true";
  } catch (err) {
    status.textContent = `cannot read the enricher: ${err.message} (retrying)`;
    status.className = "bad";
  }
}

poll();
setInterval(poll, REFRESH_S * 1000);
