"""The receiver choice across agent restarts: a new exporter with the same store resumes where the old
one wrote, when that receiver is still a candidate. Kernel-free: the in-memory store holds the same record
bytes as the pinned map (tests/kernel/test_agent_state.py covers the map itself).
"""

from __future__ import annotations

import logging
import struct

import pytest

from otel_kzt.agent import state
from otel_kzt.agent.state import MemoryReceiverStore
from otel_kzt.errors import DatapathError
from tests.unit.test_agent_failover import Cluster, url

ADDRESSES = [f"10.4.0.{i}" for i in range(1, 5)]


def failed_over(cluster: Cluster, node: str, store: MemoryReceiverStore) -> str:
    """Run an agent that writes to its first choice, then fails over; returns where it ended."""
    exp = cluster.exporter(node, store=store)
    order = cluster.ranking(node)
    assert cluster.send(exp) == order[0]
    cluster.down = {order[0]}
    assert cluster.send(exp) == order[1]
    exp.close()
    cluster.down = set()  # the first choice is alive again
    return order[1]


def test_restart_resumes_on_the_stored_receiver() -> None:
    cluster, store = Cluster(list(ADDRESSES)), MemoryReceiverStore()
    second = failed_over(cluster, "node-r", store)
    writes = store.writes
    restarted = cluster.exporter("node-r", store=store)  # a new process: nothing in memory but the store
    assert restarted.current is None
    assert [cluster.send(restarted) for _ in range(3)] == [second] * 3  # not back to the first choice
    assert restarted.current is not None and restarted.current.url == second
    assert store.writes == writes  # resuming is no change: nothing written


def test_without_the_store_a_restart_goes_back_to_the_first_choice() -> None:
    """The control: the same sequence without a store moves back (what the store exists to prevent)."""
    cluster = Cluster(list(ADDRESSES))
    failed_over(cluster, "node-r", MemoryReceiverStore())
    assert cluster.send(cluster.exporter("node-r")) == cluster.ranking("node-r")[0]


def test_stored_receiver_gone_starts_on_the_first_ranked() -> None:
    cluster, store = Cluster(list(ADDRESSES)), MemoryReceiverStore()
    second = failed_over(cluster, "node-g", store)
    cluster.addresses = [a for a in ADDRESSES if url(a) != second]  # that replica was removed meanwhile
    assert cluster.send(cluster.exporter("node-g", store=store)) == cluster.ranking("node-g")[0]
    assert store.load() == state.receiver_id(cluster.ranking("node-g")[0])


def test_each_change_is_written_once() -> None:
    cluster, store = Cluster(list(ADDRESSES)), MemoryReceiverStore()
    exp = cluster.exporter("node-w", store=store)
    order = cluster.ranking("node-w")
    sent = [cluster.send(exp) for _ in range(3)]
    assert (sent, store.writes) == ([order[0]] * 3, 1)  # the first choice, written once
    cluster.down = {order[0]}
    sent = [cluster.send(exp) for _ in range(3)]
    assert (sent, store.writes) == ([order[1]] * 3, 2)
    cluster.down = {order[1]}
    cluster.send(exp)
    assert store.writes == 3
    assert store.load() == state.receiver_id(order[2])


def test_stored_receiver_failing_at_start_moves_on_in_rendezvous_order() -> None:
    """Resumed on the stored receiver, which then fails: the next one after it, as for any failover."""
    cluster = Cluster(list(ADDRESSES))
    order = cluster.ranking("node-f")
    store = MemoryReceiverStore(state.encode(state.receiver_id(order[1])))
    cluster.down = {order[1]}
    assert cluster.send(cluster.exporter("node-f", store=store)) == order[2]
    assert (store.load(), store.writes) == (state.receiver_id(order[2]), 1)


@pytest.mark.parametrize(
    "raw",
    [struct.pack("<IIQ", 7, 0, 1), b"\x01\x00\x00", struct.pack("<IIQQ", 1, 0, 1, 1)],
    ids=["unknown-version", "short", "long"],
)
def test_a_bad_record_is_ignored_and_logged(raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster(list(ADDRESSES))
    order = cluster.ranking("node-b")
    # A bad record that happens to carry the id of a lower-ranked receiver must not be followed.
    raw = raw.replace(struct.pack("<Q", 1), struct.pack("<Q", state.receiver_id(order[1])))
    store = MemoryReceiverStore(raw)
    with caplog.at_level(logging.WARNING, logger="otel_kzt.agent.state"):
        assert cluster.send(cluster.exporter("node-b", store=store)) == order[0]
    assert "ignoring stored receiver" in caplog.text
    assert store.load() == state.receiver_id(order[0])  # overwritten with a good record


def test_a_zero_record_is_empty_and_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="otel_kzt.agent.state"):
        assert state.decode(bytes(16), "fresh map") is None
    assert caplog.text == ""


def test_record_format_is_pinned() -> None:
    """The bytes a previous agent version wrote must decode the same: the format is a contract."""
    receiver = state.receiver_id("http://x:1")
    assert receiver == 5649231079986416124
    assert state.encode(receiver) == struct.pack("<IIQ", 1, 0, receiver)
    assert state.decode(state.encode(receiver), "test") == receiver


class BrokenStore:
    """A store whose map calls fail (bpffs gone, a permission taken away)."""

    def load(self) -> int | None:
        raise DatapathError("map stored receiver: Bad file descriptor (errno 9)")

    def save(self, receiver: int) -> None:
        raise DatapathError("map stored receiver: Bad file descriptor (errno 9)")


def test_a_failing_store_never_stops_the_export(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster(list(ADDRESSES))
    with caplog.at_level(logging.WARNING, logger="otel_kzt.agent.state"):
        exp = cluster.exporter("node-x", store=BrokenStore())
        assert cluster.send(exp) == cluster.ranking("node-x")[0]
    assert "cannot read the stored receiver" in caplog.text
    assert "cannot store the current receiver" in caplog.text
