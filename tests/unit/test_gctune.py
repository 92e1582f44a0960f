"""The services' garbage-collector setting: young collections spaced out, never made more frequent."""

from __future__ import annotations

import gc
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
