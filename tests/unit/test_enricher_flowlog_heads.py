"""The OTLP flow-log records' heads come from a table made on first use; requests on the receiver's
workers reach that first use at once. A table seen half made answered a request UNKNOWN (IndexError):
its points never forwarded, and a sender that gave up on UNKNOWN lost its share (bench/enricher_cluster.py,
2 workers: 775,000 of 800,000 forwarded)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from otel_kzt.enricher.processing import flowlogs


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the GIL changes hands as often as it can: the first use overlaps
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_concurrent_first_uses_of_the_record_heads_all_succeed(fast_switching: None) -> None:
    sizes = [flowlogs._SHORT_RECORD - 1, 300, 1]
    expected = flowlogs._record_heads(sizes)
    failures: list[BaseException] = []
    for _round in range(20):
        flowlogs._record_heads_table.cache_clear()  # every round a first use
        start = threading.Barrier(4)

        def use(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                assert flowlogs._record_heads(sizes) == expected
            except BaseException as exc:  # collected, asserted below
                failures.append(exc)

        threads = [threading.Thread(target=use) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
