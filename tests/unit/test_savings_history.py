"""Window increases, before/after a routing change, and the engine that runs the rules over them."""

from __future__ import annotations

import json

import pytest

from otel_kzt import schema
from otel_kzt.k8s.servicemodel import ClusterVersion
from otel_kzt.savings.engine import Engine
from otel_kzt.savings.history import History, increase
from otel_kzt.savings.jsonform import report_from_json, report_to_json
from otel_kzt.savings.model import (
    SECONDS_PER_MONTH,
    Direction,
    FlowKey,
    Kind,
    ServiceState,
    Workload,
    flow_key,
)

V134 = ClusterVersion(1, 34, "v1.34.1")
WEB = Workload("shop", "Deployment", "web")
API = Workload("shop", "Deployment", "api")


def _key(cz: str, sz: str, direction: Direction = Direction.FROM) -> FlowKey:
    return flow_key(WEB, cz, API, sz, service=("shop", "api"), direction=direction)


def _state(routing: str = schema.ROUTING_NONE, zones: dict[str, int] | None = None) -> ServiceState:
    return ServiceState("shop", "api", "ClusterIP", routing, zones or {"a": 1, "b": 1})


def test_increase_handles_resets() -> None:
    assert increase((10.0, 1.0), (4.0, 0.5)) == (6.0, 0.5)
    assert increase((3.0, 0.1), (4.0, 0.5)) == (3.0, 0.1)  # restarted from zero
    assert increase((3.0, 0.1), None) == (3.0, 0.1)


def test_window_uses_the_snapshot_one_window_back() -> None:
    h = History(window_s=60.0)
    assert h.tick_s == 1.0 and h.window() == (0.0, 0.0, {})
    k = _key("a", "b")
    for t in range(0, 121, 10):
        h.add(float(t), {k: (t * 100.0, t * 1e-6)})
    start, end, deltas = h.window()
    assert (start, end) == (60.0, 120.0)
    assert deltas[k] == pytest.approx((6000.0, 60e-6))
    assert h.snapshots <= 8  # 60, 70, ... 120: older ones dropped


def test_window_shorter_than_asked_just_after_start() -> None:
    h = History(window_s=3600.0)
    assert h.tick_s == 60.0
    k = _key("a", "b")
    h.add(0.0, {})
    h.add(30.0, {k: (500.0, 0.0)})  # within one tick: latest only, no new snapshot
    assert h.snapshots == 1
    assert h.window() == (0.0, 30.0, {k: (500.0, 0.0)})


def test_flows_that_did_not_move_are_left_out() -> None:
    h = History(window_s=10.0)
    k, idle = _key("a", "b"), _key("b", "a")
    h.add(0.0, {k: (1.0, 0.0), idle: (5.0, 0.0)})
    h.add(20.0, {k: (9.0, 0.0), idle: (5.0, 0.0)})
    assert h.window()[2] == {k: (8.0, 0.0)}


def _step(engine: Engine, t: float, total: float, state: ServiceState):  # type: ignore[no-untyped-def]
    """Traffic from a (client) to b (endpoint) growing to `total` bytes at `t`."""
    return engine.update(t, {state.key: state}, {_key("a", "b"): (total, total * 1e-9)}, V134)


def test_engine_records_a_routing_change_with_before_and_after() -> None:
    engine = Engine(window_s=10.0)
    before = _state()
    for t in range(11):
        report = _step(engine, float(t), 1000.0 * t, before)  # 1000 B/s, all crossing
    (rec,) = [r for r in report.recommendations if r.kind is Kind.PREFER_SAME_ZONE]
    assert rec.bytes_per_second == pytest.approx(1000.0)
    assert rec.usd_per_month == pytest.approx(1000e-9 * SECONDS_PER_MONTH)
    assert report.setting == "PreferSameZone" and report.covered_seconds == 10.0
    after = _state("PreferSameZone")
    report = _step(engine, 11.0, 11000.0, after)  # the change is seen at t=11
    (svc,) = report.services
    assert svc.change is not None and svc.change.at == 11.0
    assert (svc.change.routing_before, svc.change.routing_after) == ("none", "PreferSameZone")
    assert svc.change.before.bytes_per_second == pytest.approx(1000.0)
    for t in range(12, 30):
        report = _step(engine, float(t), 11000.0 + 100.0 * (t - 11), after)  # 100 B/s still crossing
    (svc,) = report.services
    assert svc.change is not None
    assert (svc.change.after.start, svc.change.after.end) == (11.0, 21.0)  # one window after, then frozen
    assert svc.change.after.bytes_per_second == pytest.approx(100.0)
    assert svc.change.before.bytes_per_second == pytest.approx(1000.0)
    assert not [r for r in report.recommendations if r.kind is Kind.PREFER_SAME_ZONE]


def test_engine_records_endpoint_zone_changes_too() -> None:
    engine = Engine(window_s=10.0)
    _step(engine, 0.0, 0.0, _state(zones={"a": 1}))
    report = _step(engine, 1.0, 10.0, _state(zones={"a": 1, "b": 2}))
    change = report.services[0].change
    assert change is not None and (change.zones_before, change.zones_after) == (("a",), ("a", "b"))
    # A new endpoint in a zone that had one already changes nothing that routing depends on.
    report = _step(engine, 2.0, 20.0, _state(zones={"a": 2, "b": 2}))
    assert report.services[0].change is not None and report.services[0].change.at == 1.0


def test_engine_off_while_services_cannot_be_read() -> None:
    engine = Engine(window_s=10.0)
    report = engine.update(5.0, None, {}, None, "services: 403 Forbidden")
    assert not report.enabled and report.reason == "services: 403 Forbidden" and report.recommendations == ()


def test_report_json_round_trip() -> None:
    engine = Engine(window_s=10.0)
    for t in range(11):
        _step(engine, float(t), 1000.0 * t, _state())
    report = _step(engine, 11.0, 11000.0, _state("PreferSameZone"))
    data = json.loads(json.dumps(report_to_json(report)))
    assert report_from_json(data) == report
    assert data["usd_per_month"] == pytest.approx(report.usd_per_month)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("window_seconds"), "savings.window_seconds: expected float"),
    (lambda d: d.update(enabled="yes"), "savings.enabled: expected bool"),
    (lambda d: d["recommendations"].append({"recommendation": "x"}), "'x' is not a valid Kind"),
    (lambda d: d.update(generated_at=True), "savings.generated_at: expected float"),
])  # fmt: skip
def test_report_json_refuses_bad_layouts(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(window_s=10.0)
    data = report_to_json(_step(engine, 0.0, 0.0, _state()))
    mutate(data)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        report_from_json(data)
