"""The demo's terminal view, computed from the enricher's Prometheus `/metrics` text.

Pure functions: `parse` turns one scrape into samples, `frame` compares two scrapes (rates) and `render`
writes the table. What is shown comes only from the enricher's counters, so what the view says is what a
Prometheus scraping the enricher would say.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.savings.render import human_bytes

SECONDS_PER_MONTH = 30 * 24 * 3600
L_SRC_NS = schema.prom_label(schema.SOURCE_NAMESPACE_NAME)
L_SRC_KIND = schema.prom_label(schema.SOURCE_WORKLOAD_KIND)
L_SRC_WL = schema.prom_label(schema.SOURCE_WORKLOAD_NAME)
L_DST_NS = schema.prom_label(schema.DESTINATION_NAMESPACE_NAME)
L_DST_KIND = schema.prom_label(schema.DESTINATION_WORKLOAD_KIND)
L_DST_WL = schema.prom_label(schema.DESTINATION_WORKLOAD_NAME)
L_SRC_ZONE = schema.prom_label(schema.SOURCE_ZONE)
L_DST_ZONE = schema.prom_label(schema.DESTINATION_ZONE)
L_CLASS = schema.prom_label(schema.TRAFFIC_CLASS)
FLOW_BYTES = f"{schema.PROM_FLOW_BYTES}_total"
ZONE_BYTES = f"{schema.PROM_ZONE_TRAFFIC_BYTES}_total"
COST = f"{schema.PROM_ESTIMATED_COST}_total"
CLASSES = tuple(c.value for c in schema.TrafficClass)

Labels = Mapping[str, str]
Key = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Scrape:
    taken: float  # monotonic seconds
    samples: dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value)

    def sum_by(self, name: str, keys: tuple[str, ...], **match: str) -> dict[Key, float]:
        """Sum the samples of `name` whose labels equal `match`, grouped by the values of `keys`."""
        out: dict[Key, float] = defaultdict(float)
        for labels, value in self.samples.get(name, []):
            if all(labels.get(k) == v for k, v in match.items()):
                out[tuple(labels.get(k, "") for k in keys)] += value
        return dict(out)


def parse(text: str, taken: float) -> Scrape:
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return Scrape(taken=taken, samples=dict(samples))


def agents_reporting(scrape: Scrape, now_unix: float, max_age_s: float) -> int:
    """Agents whose last report reached the enricher within `max_age_s` (its last-report gauge)."""
    return sum(1 for _labels, ts in scrape.samples.get(schema.ENRICHER_AGENT_LAST_REPORT, [])
               if now_unix - ts <= max_age_s)


@dataclass(frozen=True, slots=True)
class Talker:
    source: str
    destination: str
    bytes_per_s: float
    total_bytes: float
    usd_per_month: float


@dataclass(frozen=True, slots=True)
class Frame:
    seconds: float  # the interval the rates cover
    talkers: list[Talker]  # cross-zone, biggest first
    zone_rates: dict[tuple[str, str], float]  # (source zone, destination zone) -> bytes/s
    class_totals: dict[str, float]  # traffic class -> bytes since the enricher started
    class_rates: dict[str, float]
    usd_per_month: float  # at the current rate, every billed class


def workload(namespace: str, kind: str, name: str) -> str:
    if kind == schema.WorkloadKind.NODE.value or not namespace:
        return f"node {name}" if name else "(outside the cluster)"
    return f"{namespace}/{name}"


def _rates(cur: dict[Key, float], prev: dict[Key, float], seconds: float) -> dict[Key, float]:
    # A counter that went down (the enricher restarted) restarts from zero: its value is the increase.
    return {k: ((v - prev.get(k, 0.0)) if v >= prev.get(k, 0.0) else v) / seconds for k, v in cur.items()}


def frame(prev: Scrape, cur: Scrape, top: int = 10) -> Frame:
    seconds = max(cur.taken - prev.taken, 1e-9)
    pair_keys = (L_SRC_NS, L_SRC_KIND, L_SRC_WL, L_DST_NS, L_DST_KIND, L_DST_WL)
    cross = schema.TrafficClass.CROSS_ZONE.value
    pair_now = cur.sum_by(FLOW_BYTES, pair_keys, **{L_CLASS: cross})
    pair_rate = _rates(pair_now, prev.sum_by(FLOW_BYTES, pair_keys, **{L_CLASS: cross}), seconds)
    src_keys = (L_SRC_NS, L_SRC_KIND, L_SRC_WL)
    cost_rate = _rates(cur.sum_by(COST, src_keys, **{L_CLASS: cross}),
                       prev.sum_by(COST, src_keys, **{L_CLASS: cross}), seconds)
    src_rate: dict[Key, float] = defaultdict(float)
    for key, rate in pair_rate.items():
        src_rate[key[:3]] += rate
    talkers = []
    for key, rate in pair_rate.items():
        if pair_now[key] <= 0:
            continue  # a series that exists but never carried a byte is no talker
        # The enricher prices by source workload; a pair gets its share of its source's cost.
        share = rate / src_rate[key[:3]] if src_rate[key[:3]] > 0 else 0.0
        usd = cost_rate.get(key[:3], 0.0) * share * SECONDS_PER_MONTH
        talkers.append(Talker(workload(*key[:3]), workload(*key[3:]), rate, pair_now[key], usd))
    talkers.sort(key=lambda t: (-t.bytes_per_s, -t.total_bytes, t.source, t.destination))
    zone_keys = (L_SRC_ZONE, L_DST_ZONE)
    zones = _rates(cur.sum_by(ZONE_BYTES, zone_keys), prev.sum_by(ZONE_BYTES, zone_keys), seconds)
    class_now = cur.sum_by(FLOW_BYTES, (L_CLASS,))
    class_rate = _rates(class_now, prev.sum_by(FLOW_BYTES, (L_CLASS,)), seconds)
    all_cost = _rates(cur.sum_by(COST, ()), prev.sum_by(COST, ()), seconds)
    return Frame(
        seconds=seconds,
        talkers=talkers[:top],
        zone_rates={(k[0], k[1]): v for k, v in zones.items()},
        class_totals={k[0]: v for k, v in class_now.items()},
        class_rates={k[0]: v for k, v in class_rate.items()},
        usd_per_month=sum(all_cost.values()) * SECONDS_PER_MONTH,
    )


def _matrix(zone_rates: dict[tuple[str, str], float]) -> list[str]:
    zones = sorted({z for pair in zone_rates for z in pair if z})
    if not zones:
        return ["  (no zone traffic yet)"]
    width = max(12, *(len(z) + 2 for z in zones))
    lines = ["  from \\ to".ljust(width + 2) + "".join(z.rjust(width) for z in zones)]
    for src in zones:
        cells = "".join(f"{human_bytes(zone_rates.get((src, dst), 0.0))}/s".rjust(width) for dst in zones)
        lines.append(f"  {src}".ljust(width + 2) + cells)
    return lines


def render(fr: Frame, metrics_url: str, title: str) -> str:
    lines = [title, "", f"Top cross-zone talkers (rates over the last {fr.seconds:.1f}s)"]
    # Columns as wide as the names shown (within limits), so the table fits narrow terminals when it can.
    src_w = min(40, max([len("source workload"), *(len(t.source) for t in fr.talkers)]))
    dst_w = min(44, max([len("destination workload"), *(len(t.destination) for t in fr.talkers)]))
    lines.append(f"  {'source workload':<{src_w}} {'destination workload':<{dst_w}} {'rate':>11} "
                 f"{'total':>10} {'est. $/month':>12}")
    for t in fr.talkers:
        lines.append(f"  {t.source:<{src_w}.{src_w}} {t.destination:<{dst_w}.{dst_w}} "
                     f"{human_bytes(t.bytes_per_s) + '/s':>11} {human_bytes(t.total_bytes):>10} "
                     f"{t.usd_per_month:>12.2f}")
    if not fr.talkers:
        lines.append("  (no cross-zone traffic reported yet)")
    lines += ["", "Zone x zone (bytes/s, source zone -> destination zone)", *_matrix(fr.zone_rates), ""]
    lines.append("Per traffic class")
    for cls in CLASSES:
        if cls in fr.class_totals:
            lines.append(f"  {cls:<14} {human_bytes(fr.class_rates.get(cls, 0.0)) + '/s':>11} "
                         f"{human_bytes(fr.class_totals[cls]):>10} total")
    lines += [f"  estimated cost at this rate: ${fr.usd_per_month:,.2f} / month", ""]
    lines.append(f"Metrics: {metrics_url}")
    lines.append("PromQL:  topk(10, sum by (source_k8s_workload_name, destination_k8s_workload_name) "
                 f'(rate({FLOW_BYTES}{{{L_CLASS}="cross-zone"}}[1m])))')
    return "\n".join(lines)
