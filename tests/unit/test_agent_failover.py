"""Which receiver an agent writes to: sticky after a failover, kept across DNS re-ranking.

Moving between two live receivers leaves the agent's totals on the one it left until that one's series
TTL (counted twice in the sum over replicas), so the agent moves only when its receiver fails. Over real
gRPC with two receivers, and with fake transports behind a fake DNS name for the ranking cases.
"""

from __future__ import annotations

import threading
import time

from otel_kzt.agent.config import OtlpConfig
from otel_kzt.agent.export import Exporter, rendezvous_rank
from otel_kzt.agent.state import ReceiverStore
from otel_kzt.agent.transport import Target
from otel_kzt.errors import RetryableExportError
from tests.unit.test_agent_export import BODY
from tests.unit.test_agent_support import GrpcReceiver


def test_failover_is_sticky_over_real_grpc() -> None:
    """The agent stays on the receiver it failed over to when its first choice comes back: moving back
    would leave its contribution on the second one (counted twice until that one's series TTL)."""
    a, b = GrpcReceiver().start(), GrpcReceiver().start()
    try:
        endpoints = f"http://127.0.0.1:{a.port},http://127.0.0.1:{b.port}"
        cfg = OtlpConfig(endpoints=tuple(endpoints.split(",")), timeout_s=1.0)
        exp = Exporter(cfg, "node-a", down_s=0.5, max_backoff_s=0.2)
        preferred = exp.ranked_targets()[0]
        first, second = (a, b) if str(a.port) in preferred.url else (b, a)
        stop = threading.Event()
        assert exp.export([BODY], time.monotonic() + 3, stop).sent == 1
        assert (len(first.snapshot()), len(second.snapshot())) == (1, 0)
        port = first.port
        first.stop()
        moved = exp.export([BODY, BODY], time.monotonic() + 3, stop)
        # The move sends nothing of the old runs to the new receiver (DESIGN §5.7: new runs begin there).
        assert (moved.switched, moved.sent, moved.failed, len(second.snapshot())) == (True, 0, 0, 0)
        assert exp.export([BODY], time.monotonic() + 3, stop).sent == 1
        assert len(second.snapshot()) == 1  # failed over
        first.port = port
        first.start()
        time.sleep(0.6)  # past down_s: the first choice is back and not marked failed any more
        for _ in range(3):
            assert exp.export([BODY], time.monotonic() + 3, stop).sent == 1
        assert (len(first.snapshot()), len(second.snapshot())) == (1, 4)  # stayed
        assert exp.current is not None and str(second.port) in exp.current.url
        exp.close()
        exp.close()
    finally:
        a.stop()
        b.stop()


class FakeTransport:
    """Delivers unless its url is in `cluster.down` (then refused); records where each body went."""

    def __init__(self, target: Target, cluster: Cluster) -> None:
        self.url, self.cluster = target.url, cluster

    def send(self, body: bytes, timeout_s: float) -> int:
        if self.url in self.cluster.down:
            raise RetryableExportError(f"{self.url}: connection refused")
        self.cluster.log.append(self.url)
        return 0

    def close(self) -> None:
        """Nothing held."""


class Cluster:
    """Receivers as URLs behind one DNS name: `addresses` is what it resolves to now."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.down: set[str] = set()
        self.log: list[str] = []
        self.switches = 0  # moves to another receiver (each begins new runs)

    def exporter(self, node: str, down_s: float = 0.0, store: ReceiverStore | None = None) -> Exporter:
        cfg = OtlpConfig(endpoints=("http://enricher.svc:4317",), timeout_s=1.0)
        return Exporter(
            cfg,
            node,
            transport_factory=lambda t: FakeTransport(t, self),
            resolver=lambda host, port: list(self.addresses),
            down_s=down_s,
            max_backoff_s=0.01,
            store=store,
        )

    def ranking(self, node: str) -> list[str]:
        """The pure rendezvous order of the current addresses for `node`."""
        return [t.url for t in rendezvous_rank(node, [Target(url(a), a, False) for a in self.addresses])]

    def send(self, exp: Exporter) -> str:
        """One interval, as the service runs it: an export that moves to another receiver sends nothing
        of the old runs there (the service begins new ones), the next interval's export goes there."""
        result = exp.export([BODY], time.monotonic() + 1, threading.Event())
        if result.switched:
            assert (result.sent, result.failed) == (0, 0)
            self.switches += 1
            result = exp.export([BODY], time.monotonic() + 1, threading.Event())
        assert result.sent == 1 and not result.switched
        return self.log[-1]


def url(address: str) -> str:
    return f"http://{address}:4317"


def test_moves_to_the_next_in_rendezvous_order_only_on_failure() -> None:
    cluster = Cluster([f"10.2.0.{i}" for i in range(1, 5)])
    exp = cluster.exporter("node-s")
    order = cluster.ranking("node-s")
    assert cluster.send(exp) == order[0]
    cluster.down = {order[0]}
    assert cluster.send(exp) == order[1]
    cluster.down = {order[1]}  # the first is back, the current one fails: on to the next after it
    assert cluster.send(exp) == order[2]
    cluster.down = set()
    assert [cluster.send(exp) for _ in range(3)] == [order[2]] * 3  # everyone up: stays


def test_dns_changes_re_rank_but_keep_the_working_receiver() -> None:
    cluster = Cluster([f"10.3.0.{i}" for i in range(1, 4)])
    nodes = [f"node-{i}" for i in range(40)]
    exporters = {n: cluster.exporter(n) for n in nodes}
    before = {n: cluster.send(e) for n, e in exporters.items()}
    cluster.addresses = [*cluster.addresses, "10.3.0.9"]  # a replica added: would be first for some
    newly_first = [n for n in nodes if cluster.ranking(n)[0] == url("10.3.0.9")]
    assert newly_first, "no agent ranks the new replica first: pick other addresses"
    assert {n: cluster.send(e) for n, e in exporters.items()} == before  # nobody moved
    gone = before[nodes[0]]
    cluster.addresses = [a for a in cluster.addresses if url(a) != gone]  # a replica removed
    after = {n: cluster.send(e) for n, e in exporters.items()}
    moved = {n for n in nodes if after[n] != before[n]}
    assert moved == {n for n in nodes if before[n] == gone}  # only the agents of the removed one
    for n in moved:  # ... to the top of the new ranking
        assert after[n] == cluster.ranking(n)[0]
