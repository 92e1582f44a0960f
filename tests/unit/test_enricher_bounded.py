"""The caches' one cap rule: emptied when full, each emptying counted and logged; below the cap nothing
goes."""

from __future__ import annotations

import logging

import pytest

from otel_kzt.enricher.processing.bounded import Cap


def test_room_empties_a_full_cache_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="otel_kzt.enricher.processing.bounded")
    cap = Cap("test.cache", 3)
    cache: dict[int, int] = {}
    for key in range(3):
        cap.room(cache)
        cache[key] = key
    assert cache == {0: 0, 1: 1, 2: 2} and cap.resets == 0  # up to the cap: all kept
    assert not caplog.records
    cap.room(cache)
    assert cache == {} and cap.resets == 1
    assert "cache emptied at its cap cache=test.cache cap=3 resets=1" in caplog.text


def test_room_serves_sets_too() -> None:
    cap = Cap("test.set", 2)
    seen = {b"a"}
    cap.room(seen)
    assert seen == {b"a"} and cap.resets == 0
    seen.add(b"b")
    cap.room(seen)
    assert not seen and cap.resets == 1
