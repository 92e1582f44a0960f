"""`otel_kzt.signals.StopSignals`: a burst of stop signals sets `stop` once, never blocks the thread it
interrupts (even one holding the very lock `stop.set()` needs), and the previous handlers come back."""

from __future__ import annotations

import os
import signal
import threading
import time

from otel_kzt.signals import StopSignals
from tests.support.processes import signal_burst


def test_a_burst_sets_stop_and_is_recorded() -> None:
    with StopSignals() as signals:
        signal_burst(os.getpid())
        assert signals.stop.wait(5)
        deadline = time.monotonic() + 5
        while signal.SIGINT not in signals.received and time.monotonic() < deadline:
            time.sleep(0.01)
    # The kernel may merge the two SIGTERMs (standard signals do not queue); SIGINT always comes through.
    assert signals.received[0] == signal.SIGTERM and signals.received[-1] == signal.SIGINT


def test_a_signal_while_the_main_thread_holds_the_events_lock_does_not_deadlock() -> None:
    """The window that hung the old handler (`Event.set()` in the handler): the main thread inside the
    Event's lock when the signal arrives. Now the handler does nothing and the watcher waits its turn."""
    with StopSignals() as signals:
        with signals.stop._cond:  # type: ignore[attr-defined]
            signal_burst(os.getpid())
            time.sleep(0.2)  # the Python-level handlers run here, in this thread, lock held
            assert not signals.stop.is_set()
        assert signals.stop.wait(5)


def test_previous_handlers_and_wakeup_fd_are_restored() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1
    assert [t for t in threading.enumerate() if t.name == "kzt-signals"] == []


def test_other_signals_do_not_stop() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: seen.append(signum))  # no lock taken
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
            assert seen == [signal.SIGUSR1]
            assert not signals.stop.is_set() and signals.received == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
