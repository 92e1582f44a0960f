"""The enricher caches an address's answer per metadata generation (processing/resolution.py) and reads
the index from the receiver's workers without its lock. A writer that moved the generation before it
swapped the new binding in let a worker read the new generation with the old answer, and cache that
stale answer for as long as the generation then stayed unchanged."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from otel_kzt.k8s.decode import PodRecord
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.model import Endpoint, WorkloadKind

IP = "10.0.0.7"


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the GIL changes hands as often as it can: readers land mid-write
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _record(i: int) -> PodRecord:
    """The same pod (uid, IP) with new details each time: every upsert moves the generation."""
    endpoint = Endpoint("n1", WorkloadKind.DEPLOYMENT, "web", pod_name=f"p{i}", namespace="ns", pod_uid="u")
    return PodRecord("u", endpoint, (IP,), False)


def test_a_reader_of_a_generation_sees_at_least_its_bindings(fast_switching: None) -> None:
    index = ClusterIndex(clock=lambda: 1000.0)
    index.register_source("test")
    index.upsert_pod(_record(0))
    index.mark_synced("test")
    first: dict[int, int] = {index.generation: 0}  # generation -> the upsert that made it
    seen: list[tuple[int, int]] = []  # (generation read first, the upsert whose answer came back)
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            generation = index.generation
            endpoint = index.lookup(IP)
            assert endpoint is not None and endpoint.pod_name is not None
            seen.append((generation, int(endpoint.pod_name[1:])))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for i in range(1, 3000):
            index.upsert_pod(_record(i))
            first[index.generation] = i
    finally:
        done.set()
        for reader in readers:
            reader.join()
    stale = [(g, got) for g, got in seen if got < first[g]]
    assert len(seen) > 1000
    assert stale == []
