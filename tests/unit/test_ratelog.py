"""A recurring failure is logged once per kind, then once per window with the count of the quiet ones."""

from __future__ import annotations

import logging

import pytest

from otel_kzt.ratelog import KindLog


def test_once_per_kind_then_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    kinds = KindLog(logging.getLogger("test.ratelog"), every_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR):
        assert kinds.error(RuntimeError("a"), "failed: where=%s", "x")
        assert not kinds.error(RuntimeError("b"), "failed: where=%s", "x")  # same kind: counted only
        assert kinds.error(ValueError("c"), "failed: where=%s", "y")  # another kind: its own line
        now[0] = 61.0
        assert kinds.error(RuntimeError("d"), "failed: where=%s", "x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "failed: where=x kind=RuntimeError not_logged=0",
        "failed: where=y kind=ValueError not_logged=0",
        "failed: where=x kind=RuntimeError not_logged=1",
    ]
    assert all(r.exc_info is not None for r in caplog.records)  # the traceback, to fix the cause
