"""The services' garbage-collector setting: young collections spaced out, never made more frequent, and a
burst of new objects kept out of them while it lasts (its cycles collected after it)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from otel_kzt import gctune


@pytest.fixture
def thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


@pytest.mark.usefixtures("thresholds")
def test_young_collections_are_spaced_out_and_the_older_generations_kept() -> None:
    gc.set_threshold(700, 11, 12)
    gctune.space_collections()
    assert gc.get_threshold() == (gctune.YOUNG_THRESHOLD, 11, 12)


@pytest.mark.usefixtures("thresholds")
def test_a_wider_setting_is_never_lowered() -> None:
    gc.set_threshold(10 * gctune.YOUNG_THRESHOLD, 10, 10)
    gctune.space_collections()
    assert gc.get_threshold() == (10 * gctune.YOUNG_THRESHOLD, 10, 10)


class Cycle:
    """An object in a reference cycle (only the cyclic collector frees it)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def no_burst() -> Iterator[None]:
    gctune.burst(False)
    gc.collect()
    yield
    gctune.burst(False)


@pytest.mark.usefixtures("no_burst")
def test_a_burst_sets_its_objects_aside_and_its_end_gives_their_cycles_back() -> None:
    gone = weakref.ref(Cycle())
    kept = [Cycle() for _ in range(100)]
    gctune.burst(True)
    assert gc.get_freeze_count() >= 101
    gctune.burst(True)  # a second step: still set aside
    gc.collect()
    assert gone() is not None  # not walked while set aside
    gctune.burst(False)
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None  # the burst over, its cycles are collected
    assert all(k.me is k for k in kept)


@pytest.mark.usefixtures("no_burst", "thresholds")
def test_a_burst_gives_everything_back_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted as allocations since the last collection (no young collection runs in between here)."""
    gc.set_threshold(gctune.YOUNG_THRESHOLD, 10, 10)
    monkeypatch.setattr(gctune, "BURST_DEFERRED", 1_000)
    gctune.burst(True)
    first = gc.get_freeze_count()
    assert first > 0
    kept = [Cycle() for _ in range(2_000)]  # more than the bound allows: all given back
    gctune.burst(True)
    assert gc.get_freeze_count() == 0
    gc.collect()  # a collection: counted afresh
    gctune.burst(True)  # and a new bound begins
    assert gc.get_freeze_count() > len(kept)
