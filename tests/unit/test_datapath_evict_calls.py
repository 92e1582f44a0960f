"""flowtables' eviction steps in batch calls: the evictor's keys listed in one BPF_MAP_UPDATE_BATCH, the
dead flows and their dying entries deleted in one BPF_MAP_DELETE_BATCH each (a key found gone stops a
batch: the rest are deleted one by one), the dying map read once. The kernel's side of the protocol is
proved in tests/kernel/test_datapath_lifecycle.py; here, which calls carry which keys."""

from __future__ import annotations

import ctypes

import pytest

from otel_kzt.agent.datapath import bpfsys, flowmap, flowtables
from otel_kzt.agent.datapath.bpfmap import u32
from otel_kzt.agent.datapath.flowtables import FlowTables
from otel_kzt.agent.flows import FlowCounters


class FakeMap:
    """What FlowTables uses of a BpfMap: sizes, an fd, element calls (recorded)."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.fd, self.key_size, self.value_size = fd, key_size, value_size
        self.entries: dict[bytes, bytes] = {}
        self.deleted: list[bytes] = []

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(key)

    def update(self, key: bytes, value: bytes) -> None:
        self.entries[key] = value

    def delete(self, key: bytes) -> bool:
        self.deleted.append(key)
        return self.entries.pop(key, None) is not None


def raw4(n: int) -> bytes:
    return flowmap.V4.key.pack(17, 2, 53, bytes([10, 0, 0, n]), bytes([10, 0, 1, 1]))


def test_delete_all_goes_on_one_by_one_after_a_key_found_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    table = FakeMap(3, 12, 48)
    keys = [raw4(n) for n in range(5)]
    batches: list[tuple[int, bytes, int]] = []

    def delete_batch(fd: int, buf: ctypes.Array[ctypes.c_char], count: int) -> int:
        batches.append((fd, buf.raw, count))
        return 2  # the kernel deleted two, then met a key already gone

    monkeypatch.setattr(bpfsys, "map_delete_batch", delete_batch)
    flowtables.delete_all(table, keys)  # type: ignore[arg-type]
    assert batches == [(3, b"".join(keys), 5)]
    assert table.deleted == keys[2:]


def test_delete_all_of_nothing_calls_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpfsys, "map_delete_batch", lambda *a: pytest.fail("called"))
    flowtables.delete_all(FakeMap(3, 12, 48), [])  # type: ignore[arg-type]


def test_mark_lists_the_keys_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    keys_map, count = FakeMap(4, 4, 12), FakeMap(5, 4, 4)
    tables = FlowTables({"evict_keys4": keys_map, "evict_count": count}, 16, 9, 0)  # type: ignore[dict-item]
    writes: list[tuple[int, bytes, bytes, int]] = []

    def update_batch(fd: int, k: ctypes.Array[ctypes.c_char], v: ctypes.Array[ctypes.c_char], n: int) -> None:
        writes.append((fd, k.raw, v.raw, n))

    def test_run(fd: int) -> int:
        assert fd == 9
        count.entries[u32(flowtables.EVICT_RESULT_INDEX)] = u32(3)
        return 0

    monkeypatch.setattr(bpfsys, "map_update_batch", update_batch)
    monkeypatch.setattr(bpfsys, "test_run", test_run)
    batch = [raw4(n) for n in range(3)]
    assert tables._mark(flowmap.V4, batch) == 3
    assert writes == [(4, u32(0) + u32(1) + u32(2), b"".join(batch), 3)]
    assert keys_map.entries == {}  # nothing element by element
    assert count.entries[u32(flowmap.V4.evict_count_index)] == u32(3)
    assert count.entries[u32(flowmap.V6.evict_count_index)] == u32(0)


def test_fold_dying_reads_the_map_once_and_deletes_only_the_flows_folded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dying = FakeMap(6, 12, 16)
    ours, other = raw4(1), raw4(2)
    dying.entries = {ours: flowmap.OVERFLOW_FORMAT.pack(100, 2), other: flowmap.OVERFLOW_FORMAT.pack(7, 1)}
    reads: list[int] = []

    def batches(fd: int, ks: int, vs: int, chunk: int):  # type: ignore[no-untyped-def]
        reads.append(fd)
        keys = b"".join(dying.entries)
        values = b"".join(dying.entries.values())
        yield memoryview(keys), memoryview(values), len(dying.entries)

    deleted: list[bytes] = []
    monkeypatch.setattr(bpfsys, "map_batches", batches)
    monkeypatch.setattr(flowtables, "delete_all", lambda table, keys: deleted.extend(keys))
    tables = FlowTables({"dying4": dying}, 16, 9, 0)  # type: ignore[dict-item]
    final = {ours: FlowCounters(1000, 10, 1, 2), raw4(3): FlowCounters(50, 1, 1, 2)}
    result = tables.fold_dying(flowmap.V4, final)
    assert reads == [6]
    assert {k: (c.bytes, c.packets) for k, c in result.items()} == {ours: (1100, 12), raw4(3): (50, 1)}
    assert deleted == [ours]  # the other flow's dying entry is not this eviction's
