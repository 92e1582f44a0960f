"""flowtables.FlowTables.flush: count.h's kzt_flush runs on every possible CPU before a read; a slot busy
(a run on that CPU holds it) is retried, an offline CPU is passed over (its slot waits until it is back),
and a slot that stays busy is logged and left for a later read, never forced."""

from __future__ import annotations

import errno
import logging

import pytest

from otel_kzt.agent.datapath import bpfsys, flowtables
from otel_kzt.agent.datapath.bpfsys import BpfCallError
from otel_kzt.agent.datapath.flowtables import FlowTables


def _tables(
    monkeypatch: pytest.MonkeyPatch, cpus: int, answers: dict[int, list[int | OSError]]
) -> tuple[FlowTables, list[int]]:
    """FlowTables over `cpus` CPUs whose kzt_flush runs answer in turn (a return value, or an errno
    raised; the last answer repeats), and the list of the CPUs it ran on."""
    runs: list[int] = []

    def run(fd: int, cpu: int) -> int:
        assert fd == 7
        runs.append(cpu)
        answer = answers[cpu].pop(0) if len(answers[cpu]) > 1 else answers[cpu][0]
        if isinstance(answer, OSError):
            raise BpfCallError("test-run", answer.errno or 0)
        return answer

    monkeypatch.setattr(flowtables, "possible_cpus", lambda: cpus)
    monkeypatch.setattr(bpfsys, "test_run_on_cpu", run)
    monkeypatch.setattr(flowtables, "FLUSH_WAIT_S", 0.0)
    return FlowTables({}, 16, -1, 0, flush_fd=7), runs


def test_every_cpu_is_flushed_and_a_busy_slot_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    tables, runs = _tables(monkeypatch, 3, {0: [0], 1: [1, 1, 0], 2: [0]})
    tables.flush()
    assert runs == [0, 1, 1, 1, 2]


def test_an_offline_cpu_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    tables, runs = _tables(monkeypatch, 2, {0: [OSError(errno.ENXIO, "offline")], 1: [0]})
    tables.flush()
    assert runs == [0, 1]


def test_another_error_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    tables, _ = _tables(monkeypatch, 1, {0: [OSError(errno.EPERM, "no")]})
    with pytest.raises(BpfCallError):
        tables.flush()


def test_a_slot_that_stays_busy_is_left_for_a_later_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tables, runs = _tables(monkeypatch, 2, {0: [1], 1: [0]})
    with caplog.at_level(logging.WARNING, logger="otel_kzt.agent.datapath.flowtables"):
        tables.flush()
    assert runs == [0] * flowtables.FLUSH_TRIES + [1]
    assert "CPU 0 stayed busy" in caplog.text


def test_without_a_flusher_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    _, runs = _tables(monkeypatch, 2, {0: [0], 1: [0]})
    FlowTables({}, 16, -1, 0).flush()
    assert runs == []
