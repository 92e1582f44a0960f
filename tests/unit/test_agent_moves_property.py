"""DESIGN §5.7 as a property: however sends to the receivers end, the agent's moves never count a byte
twice in the sum over receivers.

The agent's loop (`AgentService`) and export layer (`Exporter`: sticky choice, failover, retries) run over
fake transports, one per receiver, each counting what it receives with the enricher's own counting rule
(`Rule`, DESIGN §4). A drawn script says how each send ends: delivered; counted but answered too late (a
timeout after the receiver counted it); lost without being counted; refused before anything left
(`NotSent`); rejected (a permanent error: an answer, nothing counted). An export may be split into
several requests, each ending its own way. Flows grow between intervals. Summed over receivers, what the
rule counted equals what the flows sent: a late answer is not counted again by the receiver moved to, and
a send lost or never made is counted there.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from otel_kzt import schema
from otel_kzt.agent.config import AgentConfig, OtlpConfig
from otel_kzt.agent.export import Exporter
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.service import AgentService
from otel_kzt.agent.transport import Target
from otel_kzt.enricher.state.counting import Counted, Rule
from otel_kzt.errors import NoAnswer, NotSent, PermanentExportError, RetryableExportError
from tests.unit.test_agent_local import NODE, index, key
from tests.unit.test_agent_support import FakeMap, points

FLOWS = [
    key("10.0.1.5", "10.0.2.7", dport=5432),
    key("10.0.1.5", "10.0.2.9", dport=80),
    key("10.0.1.6", "10.0.2.9", dport=443),
]
URLS = tuple(f"http://10.9.0.{i}:4317" for i in range(1, 4))
OUTCOMES = ("ok", "late", "lost", "refused", "rejected")
SEC = 10**9
PROPERTIES = settings(
    max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class Receivers:
    """Every receiver's counting rule, and the script of how the next sends end (then: delivered)."""

    def __init__(self, script: list[str]) -> None:
        self.script = deque(script)
        self.rule = {url: Rule(3600.0, startup_ns=0) for url in URLS}  # started before any flow
        self.series: dict[str, dict[tuple[tuple[str, str], ...], Counted]] = {url: {} for url in URLS}
        self.counted = 0

    def receive(self, url: str, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        for p in points([request], schema.FLOW_BYTES):
            name = tuple(sorted((k, str(v)) for k, v in p.items() if not k.startswith("_")))
            counted = self.series[url].setdefault(name, Counted())
            value = int(p["_value"])  # type: ignore[call-overload]
            start, at = int(p["_start"]), int(p["_time"])  # type: ignore[call-overload]
            self.counted += max(0, int(self.rule[url].count(counted, start, at, value, 0.0)))


class ScriptedTransport:
    def __init__(self, target: Target, receivers: Receivers) -> None:
        self.url, self.receivers = target.url, receivers

    def send(self, body: bytes, timeout_s: float) -> int:
        outcome = self.receivers.script.popleft() if self.receivers.script else "ok"
        if outcome == "refused":
            raise NotSent(f"{self.url}: connection refused")
        if outcome == "rejected":
            raise PermanentExportError(f"{self.url}: 400 bad request (an answer: nothing counted)")
        if outcome == "lost":
            raise RetryableExportError(f"{self.url}: connection reset before it was read")
        self.receivers.receive(self.url, body)
        if outcome == "late":
            raise NoAnswer(f"{self.url}: deadline exceeded (counted, answered too late)")
        return 0

    def close(self) -> None:
        """Nothing held."""


@PROPERTIES
@given(
    script=st.lists(st.sampled_from(OUTCOMES), max_size=40),
    growth=st.lists(st.lists(st.integers(0, 1000), min_size=len(FLOWS), max_size=len(FLOWS)), max_size=12),
    down_s=st.sampled_from([0.0, 30.0]),
    max_points=st.sampled_from([20_000, 2, 4]),
)
def test_moves_never_count_a_byte_twice(
    script: list[str], growth: list[list[int]], down_s: float, max_points: int
) -> None:
    """`max_points` 2 or 4: one or two flows per request, so an export of several requests can end
    part-way (a move after some of its requests reached the receiver left), or lose one in the middle."""
    receivers = Receivers(script)
    otlp = OtlpConfig(endpoints=URLS, timeout_s=1.0, max_points_per_request=max_points)
    exporter = Exporter(
        otlp,
        NODE,
        transport_factory=lambda target: ScriptedTransport(target, receivers),
        down_s=down_s,
        max_backoff_s=0.001,
    )
    fake = FakeMap()
    idx = index()
    local = LocalFlows(NODE, idx, interface_addresses=frozenset)
    config = AgentConfig(node_name=NODE, otlp=otlp, idle_timeout_s=3600.0)
    service = AgentService(config, fake, exporter, local, idx, host_name="h")
    sent = 0

    def interval(added: list[int]) -> None:
        nonlocal sent
        fake.now_ns += 3 * SEC
        for flow, nbytes in zip(FLOWS, added, strict=True):
            if nbytes:
                fake.add(flow, nbytes)
                sent += nbytes
        service.export_once(time.monotonic() + 0.05, threading.Event())

    for added in growth:
        interval(added)
    quiet = [0] * len(FLOWS)
    for _ in range(100):  # quiet intervals until the script is used up, then a few to deliver everything
        if not receivers.script:
            break
        interval(quiet)
    for _ in range(4):
        interval(quiet)
    assert not receivers.script
    assert receivers.counted <= sent, f"counted twice: {receivers.counted} of {sent} bytes sent"
    assert receivers.counted == sent, f"lost: {receivers.counted} of {sent} bytes sent"
