"""Counters several threads add to are exact however the threads interleave (otel_kzt/tally.py).

CPython's GIL happens not to switch threads inside `self.n += 1` for a plain int; a free-threaded build
(or a change in where the interpreter checks for a switch) may. `_Switching` puts a switch exactly there:
its add gives the GIL away between the read and the write, as another core would run meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.enricher.receivers.budget import Downstream
from otel_kzt.enricher.receivers.caps import Errors
from otel_kzt.enricher.receivers.grpc import _Admission
from otel_kzt.errors import Overloaded
from otel_kzt.tally import Tally

THREADS, EACH = 4, 250


class _Switching(int):
    def __add__(self, other: object) -> _Switching:
        time.sleep(0)  # another thread runs between this read and the write that follows
        return _Switching(int(self) + int(other))  # type: ignore[call-overload]


def _at_once(event: Callable[[], object]) -> None:
    start = threading.Barrier(THREADS)

    def run() -> None:
        start.wait()
        for _ in range(EACH):
            event()

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _switching(tally: Tally) -> Tally:
    tally._value = _Switching(0)
    return tally


def test_a_tally_loses_no_count() -> None:
    tally = _switching(Tally())
    _at_once(tally.add)
    assert tally.value == THREADS * EACH


def test_the_export_queues_refusals() -> None:
    downstream = Downstream(lambda: "otlp/0")
    _switching(downstream._refused)

    def refused() -> None:
        with pytest.raises(Overloaded):
            downstream.check()

    _at_once(refused)
    assert downstream.refused == THREADS * EACH


def test_a_caps_resets() -> None:
    cap = Cap("test.cache", 1)
    _switching(cap._resets)

    def full() -> None:  # each thread's own cache, one shared cap (as a module's cache and its Cap)
        cap.room({0: 0})

    _at_once(full)
    assert cap.resets == THREADS * EACH


def test_the_grpc_receivers_refused_calls() -> None:
    admission = _Admission({"/m": lambda _raw, _context: b""}, limit=0)  # every call beyond the cap
    _switching(admission._refused)
    details = SimpleNamespace(method="/m")
    _at_once(lambda: admission.service(details))
    assert admission.refused == THREADS * EACH


def test_the_receivers_errors_of_ours() -> None:
    errors = Errors(logging.getLogger("test.tally"))
    _switching(errors._count)
    _at_once(lambda: errors.add(IndexError("a bug"), "/m"))
    assert errors.value == THREADS * EACH
