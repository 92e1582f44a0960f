"""`Report` <-> JSON: the body of `/api/v1/savings`, which `otel-kzt report` and the web view read.

One layout, written and read here only. Unknown keys are ignored on reading (a newer enricher may add
some); a missing or mistyped required key is a `ValueError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from otel_kzt.savings.model import (
    Change,
    Direction,
    Evidence,
    Kind,
    Period,
    Recommendation,
    Report,
    ServiceSummary,
)

Json = dict[str, Any]


def report_to_json(report: Report) -> Json:
    return {
        "generated_at": report.generated_at,
        "enabled": report.enabled,
        "reason": report.reason,
        "window_seconds": report.window_seconds,
        "covered_seconds": report.covered_seconds,
        "kubernetes_version": report.kubernetes_version,
        "setting": report.setting,
        "usd_per_month": report.usd_per_month,
        "recommendations": [_rec_to_json(r) for r in report.recommendations],
        "services": [_service_to_json(s) for s in report.services],
    }


def _rec_to_json(r: Recommendation) -> Json:
    return {
        "recommendation": r.kind.value,
        "namespace": r.namespace,
        "service": r.service,
        "workload": r.workload,
        "action": r.action,
        "setting": r.setting,
        "usd_per_month": r.usd_per_month,
        "bytes_per_second": r.bytes_per_second,
        "zones": list(r.zones),
        "endpoints_by_zone": dict(r.endpoints_by_zone),
        "evidence": [_evidence_to_json(e) for e in r.evidence],
        "note": r.note,
    }


def _evidence_to_json(e: Evidence) -> Json:
    return {
        "direction": e.direction.value,
        "client_zone": e.client_zone,
        "server_zone": e.server_zone,
        "bytes": e.bytes,
        "usd": e.usd,
    }


def _period_to_json(p: Period) -> Json:
    return {
        "start": p.start,
        "end": p.end,
        "bytes": p.bytes,
        "usd": p.usd,
        "bytes_per_second": p.bytes_per_second,
        "usd_per_month": p.usd_per_month,
    }


def _service_to_json(s: ServiceSummary) -> Json:
    out: Json = {
        "namespace": s.namespace,
        "name": s.name,
        "type": s.type,
        "routing": s.routing,
        "endpoints_by_zone": dict(s.endpoints_by_zone),
        "bytes_per_second": s.bytes_per_second,
        "usd_per_month": s.usd_per_month,
        "note": s.note,
        "change": None,
    }
    if s.change is not None:
        c = s.change
        out["change"] = {
            "at": c.at,
            "routing_before": c.routing_before,
            "routing_after": c.routing_after,
            "zones_before": list(c.zones_before),
            "zones_after": list(c.zones_after),
            "before": _period_to_json(c.before),
            "after": _period_to_json(c.after),
        }
    return out


# --- reading ---------------------------------------------------------------------------------------------


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _num(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = _get(obj, key, float, where)
    if math.isnan(value):
        raise ValueError(f"{where}.{key}: NaN")
    return float(value)


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    return str(_get(obj, key, str, where))


def _zones(obj: Mapping[str, Any], key: str, where: str) -> dict[str, int]:
    value = _get(obj, key, dict, where)
    return {str(z): int(n) for z, n in value.items()}


def report_from_json(data: Any) -> Report:
    if not isinstance(data, Mapping):
        raise ValueError("savings: expected a JSON object")
    w = "savings"
    return Report(
        generated_at=_num(data, "generated_at", w),
        enabled=bool(_get(data, "enabled", bool, w)),
        reason=_str(data, "reason", w),
        window_seconds=_num(data, "window_seconds", w),
        covered_seconds=_num(data, "covered_seconds", w),
        kubernetes_version=_str(data, "kubernetes_version", w),
        setting=_str(data, "setting", w),
        recommendations=tuple(
            _rec_from_json(r, f"{w}.recommendations[{i}]")
            for i, r in enumerate(_get(data, "recommendations", list, w))
        ),
        services=tuple(
            _service_from_json(s, f"{w}.services[{i}]") for i, s in enumerate(_get(data, "services", list, w))
        ),
    )


def _rec_from_json(r: Mapping[str, Any], w: str) -> Recommendation:
    return Recommendation(
        kind=Kind(_str(r, "recommendation", w)),
        namespace=_str(r, "namespace", w),
        service=_str(r, "service", w),
        workload=_str(r, "workload", w),
        action=_str(r, "action", w),
        usd_per_month=_num(r, "usd_per_month", w),
        bytes_per_second=_num(r, "bytes_per_second", w),
        evidence=tuple(
            _evidence_from_json(e, f"{w}.evidence[{i}]") for i, e in enumerate(_get(r, "evidence", list, w))
        ),
        endpoints_by_zone=_zones(r, "endpoints_by_zone", w),
        zones=tuple(str(z) for z in _get(r, "zones", list, w)),
        setting=_str(r, "setting", w),
        note=_str(r, "note", w),
    )


def _evidence_from_json(e: Mapping[str, Any], w: str) -> Evidence:
    return Evidence(
        Direction(_str(e, "direction", w)),
        _str(e, "client_zone", w),
        _str(e, "server_zone", w),
        _num(e, "bytes", w),
        _num(e, "usd", w),
    )


def _period_from_json(p: Mapping[str, Any], w: str) -> Period:
    return Period(_num(p, "start", w), _num(p, "end", w), _num(p, "bytes", w), _num(p, "usd", w))


def _service_from_json(s: Mapping[str, Any], w: str) -> ServiceSummary:
    change = None
    raw = s.get("change")
    if raw is not None:
        cw = f"{w}.change"
        change = Change(
            at=_num(raw, "at", cw),
            routing_before=_str(raw, "routing_before", cw),
            routing_after=_str(raw, "routing_after", cw),
            zones_before=tuple(str(z) for z in _get(raw, "zones_before", list, cw)),
            zones_after=tuple(str(z) for z in _get(raw, "zones_after", list, cw)),
            before=_period_from_json(_get(raw, "before", dict, cw), f"{cw}.before"),
            after=_period_from_json(_get(raw, "after", dict, cw), f"{cw}.after"),
        )
    return ServiceSummary(
        namespace=_str(s, "namespace", w),
        name=_str(s, "name", w),
        type=_str(s, "type", w),
        routing=_str(s, "routing", w),
        endpoints_by_zone=_zones(s, "endpoints_by_zone", w),
        bytes_per_second=_num(s, "bytes_per_second", w),
        usd_per_month=_num(s, "usd_per_month", w),
        note=_str(s, "note", w),
        change=change,
    )
