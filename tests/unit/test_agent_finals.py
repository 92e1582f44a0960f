"""Final values of evicted flows: exported on the same series, kept until delivered, bounded.

The datapath hands an evicted flow's final cumulative counters, including packets that arrived after the
agent's last read, to the next snapshot; `FakeMap` does the same (its `race` packets play the late ones).
Exports go over real gRPC to an in-process receiver.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from otel_kzt import schema
from otel_kzt.agent.flows import FlowCounters
from tests.unit.test_agent_local import key
from tests.unit.test_agent_service import FORWARDED, POD_FLOW, SEC, once, receiver, service
from tests.unit.test_agent_support import Failure, FakeMap, GrpcReceiver, points

__all__ = ["receiver"]  # the fixture, re-used

IDLE_S = 60.0


def _series(requests: list[ExportMetricsServiceRequest], dport: int = 5432) -> list[tuple[int, int, int]]:
    """(start, bytes, packets) of every exported point of the pod flow to `dport`, in send order."""
    b = points(requests, schema.FLOW_BYTES)
    p = points(requests, schema.FLOW_PACKETS)
    return [
        (int(str(x["_start"])), int(str(x["_value"])), int(str(y["_value"])))
        for x, y in zip(b, p, strict=True)
        if x.get(schema.DESTINATION_PORT) == dport
    ]


def _last(receiver: GrpcReceiver, metric: str) -> object:
    return points(receiver.snapshot()[-1:], metric)[0]["_value"]


def test_racing_packets_reach_the_export_on_the_same_series(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    fake.add(POD_FLOW, 100, 2)
    svc, exp = service(receiver, fake, idle_timeout_s=IDLE_S)
    once(svc)
    fake.now_ns += int(IDLE_S + 1) * SEC
    fake.race[POD_FLOW] = (30, 1)  # sent after the idle pass read the map, before the eviction
    once(svc)
    assert fake.evicted == [POD_FLOW] and POD_FLOW not in fake.flows
    start = _series(receiver.snapshot())[0][0]
    once(svc)
    once(svc)  # delivered: forgotten
    exp.close()
    assert _series(receiver.snapshot()) == [(start, 100, 2), (start, 100, 2), (start, 130, 3)]
    first, final = (
        [p for p in points([r], schema.FLOW_BYTES) if p.get(schema.DESTINATION_PORT) == 5432]
        for r in (receiver.snapshot()[0], receiver.snapshot()[2])
    )
    assert {k: v for k, v in first[0].items() if k not in ("_value", "_time")} == {
        k: v for k, v in final[0].items() if k not in ("_value", "_time")
    }  # same attributes (pod names too) and start: the same series
    assert _last(receiver, schema.OTLP_AGENT_FINALS_PENDING) == 0.0


def test_final_value_precedes_a_new_series_of_the_same_key(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    fake.add(POD_FLOW, 100)
    svc, exp = service(receiver, fake, idle_timeout_s=IDLE_S)
    once(svc)
    fake.now_ns += int(IDLE_S + 1) * SEC
    fake.race[POD_FLOW] = (5, 1)
    once(svc)
    old_start = _series(receiver.snapshot())[0][0]
    fake.now_ns += 3 * SEC
    fake.add(POD_FLOW, 7)  # the same key sends again: a new flow in the map
    once(svc)
    exp.close()
    assert _series(receiver.snapshot()[-1:]) == [(old_start, 105, 2), (fake.now_ns, 7, 1)]


def test_undelivered_final_is_retried_until_delivered(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    fake.add(POD_FLOW, 100)
    svc, exp = service(receiver, fake, idle_timeout_s=IDLE_S)
    once(svc)
    fake.now_ns += int(IDLE_S + 1) * SEC
    fake.race[POD_FLOW] = (50, 1)
    once(svc)
    receiver.fail_next(*[Failure(grpc.StatusCode.UNAVAILABLE)] * 100)
    once(svc, deadline_s=0.3)  # the final value's first export fails
    receiver.failures.clear()
    assert len(receiver.snapshot()) == 2 and not fake.finals  # the agent holds it now, not the map
    once(svc)
    once(svc)
    exp.close()
    assert [v for _, v, _ in _series(receiver.snapshot())] == [100, 100, 150]
    assert points(receiver.snapshot()[2:3], schema.OTLP_AGENT_FINALS_PENDING)[0]["_value"] == 1.0
    assert _last(receiver, schema.OTLP_AGENT_FINALS_PENDING) == 0.0


def test_finals_of_foreign_flows_are_not_exported_and_leftovers_are(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    # A previous agent process died mid-eviction: the datapath reports the finals at the first snapshot.
    t0 = fake.now_ns - 100 * SEC
    fake.finals = {POD_FLOW: FlowCounters(900, 9, t0, t0), FORWARDED: FlowCounters(50, 1, t0, t0)}
    svc, exp = service(receiver, fake)
    once(svc)
    once(svc)
    exp.close()
    exported = points(receiver.snapshot(), schema.FLOW_BYTES)
    assert [(p[schema.SOURCE_POD_NAME], p["_value"], p["_start"]) for p in exported] == [("web-1", 900, t0)]


def test_the_store_of_undelivered_finals_is_bounded_and_counted(receiver: GrpcReceiver) -> None:
    fake = FakeMap(capacity=1)  # the bound is both maps' size: 2 finals
    flows = [key("10.0.1.5", "10.0.2.7", dport=port) for port in (7001, 7002, 7003)]
    for flow in flows:
        fake.add(flow, 10)
    svc, exp = service(receiver, fake, idle_timeout_s=IDLE_S)
    fake.now_ns += int(IDLE_S + 1) * SEC
    once(svc)  # exported and evicted
    receiver.fail_next(*[Failure(grpc.StatusCode.UNAVAILABLE)] * 100)
    once(svc, deadline_s=0.3)
    receiver.failures.clear()
    once(svc)
    exp.close()
    final_request = receiver.snapshot()[-1]
    ports = sorted(str(p[schema.DESTINATION_PORT]) for p in points([final_request], schema.FLOW_BYTES))
    assert ports == ["7002", "7003"]  # the oldest was given up
    assert points([final_request], schema.OTLP_AGENT_FINALS_DROPPED)[0]["_value"] == 1


def test_shutdown_export_leaves_idle_flows_to_the_next_process(receiver: GrpcReceiver) -> None:
    """An eviction during the export on shutdown would hand the final value to a process about to exit."""
    fake = FakeMap()
    fake.add(POD_FLOW, 100)
    fake.now_ns += int(IDLE_S + 1) * SEC  # idle already
    svc, exp = service(receiver, fake, idle_timeout_s=IDLE_S, interval_s=30.0)
    stop = threading.Event()
    stop.set()
    svc.run(stop)  # no interval passes: only the export on shutdown
    exp.close()
    assert fake.evicted == [] and POD_FLOW in fake.flows
    assert [v for _, v, _ in _series(receiver.snapshot())] == [100]


@pytest.mark.parametrize("where", ["refresh", "final_heads"])
def test_a_pass_that_raises_after_the_hand_off_loses_no_final(
    receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The snapshot hands the finals over (the datapath forgets them); a pass that raises before they are
    stored (the node's addresses unreadable; a bug while their heads are built, after the head cache was
    popped) must leave them for the next pass, which exports them on their series."""
    fake = FakeMap()
    fake.add(POD_FLOW, 100, 2)
    svc, exp = service(receiver, fake, idle_timeout_s=IDLE_S)
    once(svc)
    fake.now_ns += int(IDLE_S + 1) * SEC
    fake.race[POD_FLOW] = (30, 1)
    once(svc)  # exported idle, then evicted: the final (130, 3) waits in the map for the next snapshot
    assert fake.evicted == [POD_FLOW] and fake.finals
    real = getattr(svc._local, where)

    def fails_once(*args: object) -> object:
        monkeypatch.setattr(svc._local, where, real)
        real(*args)  # whatever it changes, changed
        raise RuntimeError(f"injected in {where}")

    monkeypatch.setattr(svc._local, where, fails_once)
    result = svc._pass(time.monotonic() + 2.0, threading.Event())
    assert result.failed == 1 and not fake.finals  # handed over, the pass failed
    assert getattr(svc._local, where) == real
    once(svc)
    once(svc)  # delivered: forgotten
    exp.close()
    start = _series(receiver.snapshot())[0][0]
    assert _series(receiver.snapshot()) == [(start, 100, 2), (start, 100, 2), (start, 130, 3)]
    first, final = (
        {k: v for k, v in points([r], schema.FLOW_BYTES)[0].items() if k not in ("_value", "_time")}
        for r in (receiver.snapshot()[0], receiver.snapshot()[-2])
    )
    assert first == final  # the same series, its head built again where the cache had lost it
    assert _last(receiver, schema.OTLP_AGENT_FINALS_PENDING) == 0.0
