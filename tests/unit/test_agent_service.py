"""The interval loop end to end on a fake flow map, exporting over real gRPC to an in-process receiver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import grpc
import pytest

from otel_kzt import schema
from otel_kzt.agent.config import DEFAULT_TIMEOUT_S, AgentConfig, OtlpConfig
from otel_kzt.agent.export import Exporter, ExportResult
from otel_kzt.agent.flows import Snapshot
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.service import AgentService
from otel_kzt.enricher.state.counting import Counted, Rule
from otel_kzt.errors import DatapathError
from tests.unit.test_agent_local import NODE, index, key
from tests.unit.test_agent_support import Failure, FakeMap, GrpcReceiver, points

POD_FLOW = key("10.0.1.5", "10.0.2.7", dport=5432)
NODE_FLOW = key("192.168.0.1", "10.0.2.7", dport=10250)
FORWARDED = key("10.0.2.7", "10.0.1.5")
SEC = 10**9


@pytest.fixture
def receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver().start()
    try:
        yield r
    finally:
        r.stop()


def service(
    receiver: GrpcReceiver, fake: FakeMap, max_points: int = 20_000, **kw: object
) -> tuple[AgentService, Exporter]:
    otlp = OtlpConfig(
        endpoints=(f"http://127.0.0.1:{receiver.port}",), timeout_s=1.0, max_points_per_request=max_points
    )
    cfg = AgentConfig(node_name=NODE, otlp=otlp, cluster_name="c1", **kw)  # type: ignore[arg-type]
    exporter = Exporter(otlp, NODE, max_backoff_s=0.1)
    idx = index()
    local = LocalFlows(NODE, idx, interface_addresses=frozenset)
    return AgentService(cfg, fake, exporter, local, idx, host_name="h1"), exporter


def once(svc: AgentService, deadline_s: float = 2.0) -> None:
    svc.export_once(time.monotonic() + deadline_s, threading.Event())


def test_exports_local_flows_with_resource_and_telemetry(receiver: GrpcReceiver) -> None:
    fake = FakeMap(capacity=100)
    fake.add(POD_FLOW, 1000, 2)
    fake.add(NODE_FLOW, 300, 1)
    fake.add(FORWARDED, 5000, 5)
    fake.overflow = (77, 3)
    svc, exp = service(receiver, fake)
    once(svc)
    exp.close()
    [request] = receiver.snapshot()
    resource = {kv.key: kv.value.string_value for kv in request.resource_metrics[0].resource.attributes}
    assert resource == {
        schema.SERVICE_NAME: schema.AGENT_SERVICE_NAME,
        schema.SERVICE_VERSION: "0.1.0",
        schema.RESOURCE_NODE_NAME: NODE,
        schema.HOST_NAME: "h1",
        schema.CLUSTER_NAME: "c1",
    }
    flows = {p[schema.SOURCE_ADDRESS]: p for p in points([request], schema.FLOW_BYTES)}
    assert set(flows) == {"10.0.1.5", "192.168.0.1"}  # the forwarded flow is node-b's to count
    assert flows["10.0.1.5"]["_value"] == 1000 and flows["10.0.1.5"][schema.SOURCE_POD_NAME] == "web-1"
    assert flows["10.0.1.5"]["_start"] == fake.now_ns
    assert [p["_value"] for p in points([request], schema.FLOW_PACKETS)] == [2, 1]
    assert points([request], schema.OTLP_AGENT_FLOWS_TRACKED)[0]["_value"] == 3.0
    assert points([request], schema.OTLP_AGENT_MAP_FILL_RATIO)[0]["_value"] == 0.03
    assert points([request], schema.OTLP_AGENT_OVERFLOW_BYTES)[0]["_value"] == 77
    assert points([request], schema.OTLP_AGENT_METADATA_SYNCED)[0]["_value"] == 1.0


def test_cumulative_totals_survive_a_refused_export(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    fake.add(POD_FLOW, 100)
    svc, exp = service(receiver, fake)
    receiver.fail_next(*[Failure(grpc.StatusCode.UNAVAILABLE)] * 100)
    once(svc, deadline_s=0.3)
    assert receiver.snapshot() == []
    receiver.failures.clear()
    fake.add(POD_FLOW, 50)
    once(svc)
    exp.close()
    assert [p["_value"] for p in points(receiver.snapshot(), schema.FLOW_BYTES)] == [150]
    exports = {
        p[schema.AGENT_RESULT]: p["_value"] for p in points(receiver.snapshot(), schema.OTLP_AGENT_EXPORTS)
    }
    assert exports == {"ok": 0, "failed": 1}


def test_idle_flow_final_export_then_eviction(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    fake.add(POD_FLOW, 100)
    fake.add(FORWARDED, 100)
    svc, exp = service(receiver, fake, idle_timeout_s=60.0)
    once(svc)
    fake.now_ns += 61 * SEC  # both idle now
    receiver.fail_next(Failure(grpc.StatusCode.INVALID_ARGUMENT))
    once(svc)
    assert fake.evicted == [FORWARDED]  # the local flow's final value was not delivered: kept
    once(svc)
    assert fake.evicted == [FORWARDED, POD_FLOW] and not fake.flows
    once(svc)  # the evicted flow's final value (tests/unit/test_agent_finals.py)
    values = [p["_value"] for p in points(receiver.snapshot(), schema.FLOW_BYTES)]
    assert values == [100, 100, 100]  # the regular export, the idle one, the evicted final value
    once(svc)
    exp.close()
    assert points(receiver.snapshot()[-1:], schema.FLOW_BYTES) == []  # forgotten
    assert points(receiver.snapshot()[-1:], schema.OTLP_AGENT_FLOWS_EVICTED)[0]["_value"] == 2


def test_large_export_is_split_and_complete(receiver: GrpcReceiver) -> None:
    fake = FakeMap(capacity=10_000)
    for i in range(5000):
        fake.add(key("10.0.1.5", f"10.9.{i // 250}.{i % 250}", dport=80), i + 1)
    svc, exp = service(receiver, fake, max_points=2000)
    once(svc)
    exp.close()
    assert len(receiver.snapshot()) == 5
    got = sorted(p["_value"] for p in points(receiver.snapshot(), schema.FLOW_BYTES))
    assert got == list(range(1, 5001))


def test_run_stops_with_a_final_export(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    fake.add(POD_FLOW, 10)
    svc, exp = service(receiver, fake, interval_s=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 30  # two exports seen, however loaded the machine (no timing assert)
    while len(points(receiver.snapshot(), schema.FLOW_BYTES)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    fake.add(POD_FLOW, 5)
    stop.set()
    thread.join(5)
    exp.close()
    assert not thread.is_alive()
    values = [p["_value"] for p in points(receiver.snapshot(), schema.FLOW_BYTES)]
    assert len(values) >= 3 and values[-1] == 15


def test_unreadable_map_skips_the_interval(receiver: GrpcReceiver) -> None:
    from otel_kzt.errors import DatapathError

    class Broken(FakeMap):
        def snapshot(self) -> Snapshot:
            raise DatapathError("map gone")

    svc, exp = service(receiver, Broken())
    result = svc.export_once(time.monotonic() + 1, threading.Event())
    exp.close()
    assert (result.sent, result.failed) == (0, 1) and receiver.snapshot() == []


def test_forwarded_flows_leave_the_map_at_the_first_interval(receiver: GrpcReceiver) -> None:
    """Not ours: out at once (idle timeout far away), so forwarded traffic never fills the map."""
    fake = FakeMap()
    fake.add(POD_FLOW, 100)
    fake.add(FORWARDED, 100)
    svc, exp = service(receiver, fake, idle_timeout_s=600.0)
    once(svc)
    assert fake.evicted == [FORWARDED] and POD_FLOW in fake.flows
    exp.close()


def test_a_replaced_pod_begins_a_new_run_never_credited_with_the_old(receiver: GrpcReceiver) -> None:
    """DESIGN §5.7, the measured bug: the new pod of the same address was credited with both pods' bytes.
    Now the old pod's flow ends under its name and the new pod's bytes are a new flow, a new run."""
    fake = FakeMap()
    fake.add(POD_FLOW, 102_800)
    svc, exp = service(receiver, fake, idle_timeout_s=600.0)
    idx = svc._index
    once(svc)
    fake.now_ns += 5 * SEC  # a quiet moment; the pod is replaced by another with the same address
    idx.endpoints["10.0.1.5"] = idx.endpoints["10.0.1.5"].__class__(  # type: ignore[union-attr]
        NODE, idx.endpoints["10.0.1.5"].workload_kind, "web", pod_name="web-new", namespace="shop"
    )
    idx.generation += 1
    once(svc)  # the last export under the old name, then out of the kernel map
    assert fake.evicted == [POD_FLOW]
    fake.now_ns += 5 * SEC
    fake.add(POD_FLOW, 102_800)  # the new pod's traffic: a new kernel entry
    once(svc)
    once(svc)
    by_pod: dict[str, int] = {}
    starts: dict[str, set[int]] = {}
    for p in points(receiver.snapshot(), schema.FLOW_BYTES):
        name = str(p.get(schema.SOURCE_POD_NAME))
        by_pod[name] = max(by_pod.get(name, 0), int(p["_value"]))
        starts.setdefault(name, set()).add(int(p["_start"]))
    assert by_pod == {"web-1": 102_800, "web-new": 102_800}
    assert min(starts["web-new"]) > max(starts["web-1"])
    exp.close()


def _two_receivers(
    receiver: GrpcReceiver, other: GrpcReceiver, fake: FakeMap, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[AgentService, Exporter, GrpcReceiver, GrpcReceiver]:
    """An agent listing both receivers: (its loop, its exporter, the receiver it ranks first, the other)."""
    otlp = OtlpConfig(
        endpoints=(f"http://127.0.0.1:{receiver.port}", f"http://127.0.0.1:{other.port}"), timeout_s=timeout_s
    )
    cfg = AgentConfig(node_name=NODE, otlp=otlp, idle_timeout_s=600.0)
    exp = Exporter(otlp, NODE, max_backoff_s=0.1)
    first = exp.ranked_targets()[0]
    a, b = (receiver, other) if str(receiver.port) in first.url else (other, receiver)
    idx = index()
    local = LocalFlows(NODE, idx, interface_addresses=frozenset)
    return AgentService(cfg, fake, exp, local, idx, host_name="h"), exp, a, b


def test_a_receiver_switch_begins_new_runs_there(receiver: GrpcReceiver) -> None:
    """DESIGN §5.7: the receiver moved to gets new runs, from what the one left held: summed over both,
    by run as an enricher counts, every byte once."""
    other = GrpcReceiver().start()
    try:
        fake = FakeMap()
        fake.add(POD_FLOW, 1000)
        svc, exp, a, b = _two_receivers(receiver, other, fake)
        once(svc)
        a.stop()
        fake.now_ns += 3 * SEC
        fake.add(POD_FLOW, 10)  # after A's last value: B's to count
        once(svc, 4.0)  # A is gone: new runs on B from what A held, then the flow leaves the kernel map
        (moved,) = points(b.snapshot(), schema.FLOW_BYTES)
        assert moved["_value"] == 10 and int(moved["_start"]) > fake.now_ns - 2 * SEC
        assert fake.evicted == [POD_FLOW]
        fake.now_ns += 3 * SEC
        fake.add(POD_FLOW, 7)  # a new flow of that key: a new run
        once(svc)
        runs: dict[int, int] = {}
        for p in points(a.snapshot() + b.snapshot(), schema.FLOW_BYTES):
            runs[int(p["_start"])] = max(runs.get(int(p["_start"]), 0), int(p["_value"]))
        assert sorted(runs.values()) == [7, 10, 1000]  # 1,017 bytes sent, each counted once
        exp.close()
    finally:
        other.stop()


def _run_until(svc: AgentService, fake: FakeMap, receiver: GrpcReceiver) -> list[object]:
    """Runs the loop (interval 0.1 s) until two exports delivered, adds 5 bytes, stops: the flow's values."""
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 20  # however loaded the machine (no timing assert)
    while len(points(receiver.snapshot(), schema.FLOW_BYTES)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    fake.add(POD_FLOW, 5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    return [p["_value"] for p in points(receiver.snapshot(), schema.FLOW_BYTES)]


def test_an_untranslated_transport_error_is_a_retryable_failure(
    receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from otel_kzt.agent.transport import GrpcTransport

    real, raised = GrpcTransport.send, []

    def send(self: GrpcTransport, body: bytes, timeout_s: float) -> int:
        if len(raised) < 3:
            raised.append(1)
            raise RuntimeError("a bug in the transport")
        return real(self, body, timeout_s)

    monkeypatch.setattr(GrpcTransport, "send", send)
    fake = FakeMap()
    fake.add(POD_FLOW, 10)
    svc, exp = service(receiver, fake, interval_s=0.1)
    values = _run_until(svc, fake, receiver)
    exp.close()
    assert len(raised) == 3 and len(values) >= 3 and set(values[:-1]) == {10} and values[-1] == 15
    logged = [r for r in caplog.records if "export transport raised" in r.getMessage()]
    assert len(logged) == 1 and "kind=RuntimeError" in logged[0].getMessage()  # once per kind


def test_a_pass_that_raises_is_one_failed_export_and_the_loop_goes_on(
    receiver: GrpcReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeMap()
    fake.add(POD_FLOW, 10)
    svc, exp = service(receiver, fake, interval_s=0.1)
    real, calls, real_failed = exp.export, [], []

    def export(requests: Iterable[bytes], deadline: float, stop: threading.Event) -> ExportResult:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("nobody translated this")
        result = real(requests, deadline, stop)
        real_failed.append(result.failed)  # a real send can miss its 0.1 s interval on a loaded machine
        return result

    svc._sender = SimpleNamespace(export=export)  # type: ignore[assignment]
    values = _run_until(svc, fake, receiver)
    exp.close()
    assert len(values) >= 2 and set(values[:-1]) == {10} and values[-1] == 15  # cumulative, nothing lost
    last = receiver.snapshot()[-1:]
    exports = {p[schema.AGENT_RESULT]: p["_value"] for p in points(last, schema.OTLP_AGENT_EXPORTS)}
    assert 2 <= exports["failed"] <= 2 + sum(real_failed)  # the two raising passes, and any real miss
    logged = [r for r in caplog.records if "export pass failed" in r.getMessage()]
    assert len(logged) == 1  # the second of the same kind, within the minute, only counted


@pytest.mark.parametrize("fatal", [SystemExit(2), KeyboardInterrupt(), DatapathError("flow map gone")])
def test_fatal_conditions_still_end_the_loop(receiver: GrpcReceiver, fatal: BaseException) -> None:
    def export(requests: Iterable[bytes], deadline: float, stop: threading.Event) -> ExportResult:
        raise fatal

    fake = FakeMap()
    fake.add(POD_FLOW, 10)
    svc, exp = service(receiver, fake, interval_s=0.05)
    svc._sender = SimpleNamespace(export=export)  # type: ignore[assignment]
    with pytest.raises(type(fatal)):
        svc.run(threading.Event())
    exp.close()


def _counted(*receivers: GrpcReceiver) -> int:
    """The flow bytes the counting rule (DESIGN §4) counts at each receiver, summed over them: what the
    sum over enricher replicas shows."""
    total = 0
    for r in receivers:
        rule, series = Rule(3600.0, startup_ns=0), {}
        for p in points(r.snapshot(), schema.FLOW_BYTES):
            name = tuple(sorted((k, str(v)) for k, v in p.items() if not k.startswith("_")))
            counted = series.setdefault(name, Counted())
            total += max(0, int(rule.count(counted, int(p["_start"]), int(p["_time"]), p["_value"], 0.0)))
    return total


@pytest.mark.parametrize("at_once", [True, False], ids=["same-export", "next-export"])
def test_a_receiver_that_counted_an_export_it_did_not_answer_in_time_is_not_counted_again(
    receiver: GrpcReceiver, at_once: bool
) -> None:
    """DESIGN §5.7 through a move between two live receivers: A counts an export but answers after the
    agent's timeout, the agent moves to B (at once, in the same export, or at the next, A being marked
    down). B's new runs start from the values sent to A, not from the last ones A confirmed: before, A
    and B counted 1,027 bytes of 1,017 sent (the 10 A took too late, on both)."""
    other = GrpcReceiver().start()
    try:
        fake = FakeMap()
        fake.add(POD_FLOW, 1000)
        svc, exp, a, b = _two_receivers(receiver, other, fake, timeout_s=0.3 if at_once else 5.0)
        once(svc)
        answered = threading.Event()
        a.on_export = lambda _request: answered.wait(5)  # counted, answered too late
        fake.now_ns += 3 * SEC
        fake.add(POD_FLOW, 10)
        once(svc, 4.0 if at_once else 0.5)  # at once: timed out, then B; else: the deadline passes
        if not at_once:
            assert points(b.snapshot(), schema.FLOW_BYTES) == []  # still A's: it was not marked down yet
            once(svc)  # A marked down: B first, the move
        answered.set()
        assert points(b.snapshot(), schema.FLOW_BYTES), "the agent did not move to B"
        assert [p["_value"] for p in points(a.snapshot(), schema.FLOW_BYTES)] == [1000, 1010]
        fake.now_ns += 3 * SEC
        fake.add(POD_FLOW, 7)  # a new flow of that key (the moved one left the map): B's
        once(svc)
        assert _counted(a, b) == 1017  # each byte once: A's 1,010, then B's 7
        exp.close()
    finally:
        other.stop()
