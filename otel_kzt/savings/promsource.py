"""`otel-kzt report --prometheus URL`: the same `Report`, rebuilt from a Prometheus that scrapes the enricher.

The rules are the ones the enricher runs (`recommend`), over Prometheus' increases of the enricher's
billed-flow counters in the window; Services, their routing and ready endpoints come from the enricher's
gauges, the setting from `kzt_savings_info`. Before/after of a Service whose routing changed: its billed
bytes and dollars in the window before `kzt_service_routing_change_timestamp_seconds` and from then on
(at most one window), each read with the query API's evaluation time. Prometheus extrapolates `increase`
to the window's edges, so these numbers are estimates where the enricher's own are counts.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

from otel_kzt import schema
from otel_kzt.savings.engine import with_changes
from otel_kzt.savings.model import Change, Flow, Period, Report, ServiceKey, ServiceState, flow_of
from otel_kzt.savings.recommend import recommend
from otel_kzt.savings.sources import DEFAULT_TIMEOUT_S, SourceError, get_json
from otel_kzt.savings.version import setting_named

Sample = tuple[dict[str, str], float]
_FLOW_LABELS: Final = schema.PROM_SAVINGS_FLOW_LABELS
_BYTES: Final = f"{schema.PROM_SAVINGS_FLOW_BYTES}_total"
_COST: Final = f"{schema.PROM_SAVINGS_FLOW_COST}_total"


class Prometheus:
    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base, self.timeout_s = base_url.rstrip("/"), timeout_s

    def _result(self, promql: str, at: float | None, kind: str) -> tuple[str, list[Any]]:
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode(params)}"
        body: Any = get_json(url, self.timeout_s)
        try:
            if body["status"] != "success" or body["data"]["resultType"] != kind:
                raise SourceError(f"cannot read {url}: {body.get('error', body['data']['resultType'])}")
            return url, list(body["data"]["result"])
        except (KeyError, TypeError) as exc:
            raise SourceError(f"cannot read {url}: unexpected answer ({exc!r})") from exc

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        url, result = self._result(promql, at, "vector")
        try:
            return [(dict(r["metric"]), float(r["value"][1])) for r in result]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SourceError(f"cannot read {url}: unexpected answer ({exc!r})") from exc

    def first_sample(self, metric: str, window_s: float) -> float | None:
        """When the window's first sample of `metric` was taken (None: none in the window)."""
        url, result = self._result(f"{metric}[{max(1, round(window_s))}s]", None, "matrix")
        try:
            times = [float(v[0]) for r in result for v in r["values"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SourceError(f"cannot read {url}: unexpected answer ({exc!r})") from exc
        return min(times) if times else None


def _services(prom: Prometheus, at: float | None = None) -> dict[ServiceKey, ServiceState]:
    states: dict[ServiceKey, ServiceState] = {}
    zones: dict[ServiceKey, dict[str, int]] = {}
    for labels, value in prom.query(schema.PROM_SERVICE_ENDPOINTS, at):
        key = (labels.get("service_namespace", ""), labels.get("service", ""))
        zones.setdefault(key, {})[labels.get("zone", "")] = int(value)
    for labels, _ in prom.query(schema.PROM_SERVICE_ROUTING_INFO, at):
        key = (labels.get("service_namespace", ""), labels.get("service", ""))
        states[key] = ServiceState(
            key[0], key[1], "", labels.get("traffic_distribution", schema.ROUTING_NONE), zones.get(key, {})
        )
    return states


def _flows(prom: Prometheus, window_s: float, at: float | None = None, match: str = "") -> list[Flow]:
    window = f"[{max(1, round(window_s))}s]"
    by = ", ".join(_FLOW_LABELS)
    sums: dict[tuple[str, ...], list[float]] = {}
    for i, metric in enumerate((_BYTES, _COST)):
        for labels, value in prom.query(f"sum by ({by}) (increase({metric}{match}{window}))", at):
            sums.setdefault(tuple(labels.get(k, "") for k in _FLOW_LABELS), [0.0, 0.0])[i] = value
    return [flow_of(k, b, u) for k, (b, u) in sorted(sums.items()) if b > 0 or u > 0]


def _period(prom: Prometheus, key: ServiceKey, start: float, end: float) -> Period:
    if end - start < 1:
        return Period(start, end, 0.0, 0.0)
    match = f'{{service_namespace="{key[0]}",service="{key[1]}"}}'
    flows = _flows(prom, end - start, end, match)
    return Period(start, end, sum(f.bytes for f in flows), sum(f.usd for f in flows))


def _changes(prom: Prometheus, services: Mapping[ServiceKey, ServiceState], window_s: float,
             now: float) -> dict[ServiceKey, Change]:  # fmt: skip
    out = {}
    for labels, at in prom.query(schema.PROM_SERVICE_ROUTING_CHANGE):
        key = (labels.get("service_namespace", ""), labels.get("service", ""))
        state = services.get(key)
        if state is None:
            continue
        old = _services(prom, at - 1.0).get(key, state)
        out[key] = Change(
            at,
            old.routing,
            state.routing,
            tuple(sorted(old.zones())),
            tuple(sorted(state.zones())),
            _period(prom, key, at - window_s, at),
            _period(prom, key, at, min(now, at + window_s)),
        )
    return out


def from_prometheus(base_url: str, window_s: float, timeout_s: float = DEFAULT_TIMEOUT_S) -> Report:
    prom = Prometheus(base_url, timeout_s)
    now = time.time()
    enabled = prom.query(schema.PROM_SAVINGS_ENABLED)
    if not enabled:
        raise SourceError(
            f"{base_url} holds no {schema.PROM_SAVINGS_ENABLED}: is it scraping an otel-kzt enricher?"
        )
    if not any(v == 1.0 for _, v in enabled):
        return Report(
            now,
            False,
            "the enricher reports its savings off (kzt_savings_enabled 0): see its log",
            window_s,
            0.0,
            "",
            "",
        )
    info = prom.query(schema.PROM_SAVINGS_INFO)
    version, name = (
        (info[0][0].get("kubernetes_version", ""), info[0][0].get("setting", "")) if info else ("", "")
    )
    setting = setting_named(name)
    services = _services(prom)
    # Like the enricher's own window: as much of it as there is data for (increase() does not invent
    # the time before a series' first sample, so the rate is over the time covered).
    first = prom.first_sample(schema.PROM_SAVINGS_ENABLED, window_s)
    covered = min(window_s, now - first) if first is not None else 0.0
    recs, summaries = recommend(services, _flows(prom, window_s), covered, setting)
    summaries = with_changes(summaries, services, _changes(prom, services, window_s, now))
    return Report(now, True, "", window_s, covered, version, setting.name, tuple(recs), tuple(summaries))
