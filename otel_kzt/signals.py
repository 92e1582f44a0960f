"""Stop signals that cannot deadlock a shutdown: the handler only records, a watcher thread acts.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread is: inside
`threading.Event.wait()` holding the Event's lock, inside a logging handler holding its lock. A handler
that takes a lock (`Event.set()`, `log.info(...)`) deadlocks when it interrupts the holder of the same
lock, which a second signal arriving while the first is handled does all too easily.

So the kernel's delivery is turned into a byte on a pipe by the interpreter's C-level handler
(`signal.set_wakeup_fd`: written at once, even while the main thread is blocked in a C call), the Python
handler is a no-op, and a watcher thread reads the pipe and sets the `stop` Event, from an ordinary
thread where taking a lock is harmless. Repeated signals add bytes that the watcher drains: harmless.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CLOSE = b"\0"  # no signal has number 0: the watcher's own "exit" byte


class StopSignals:
    """`with StopSignals() as signals:` ... `signals.stop` is set once the first stop signal arrived.

    Installs handlers on entry (main thread only, as Python requires) and restores the previous handlers
    and wake-up fd on exit. `stop` may also be set directly (tests, an internal failure)."""

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS, stop: threading.Event | None = None) -> None:
        self.signums = signums
        self.stop = stop if stop is not None else threading.Event()
        self.received: list[int] = []  # in arrival order, filled by the watcher thread
        self._previous: dict[int, Any] = {}
        self._previous_fd = -1
        self._read_fd = self._write_fd = -1
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopSignals:
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._write_fd, False)  # a full pipe drops the byte, never blocks the handler
        self._watcher = threading.Thread(target=self._watch, name="kzt-signals", daemon=True)
        self._watcher.start()
        try:
            self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
            for signum in self.signums:
                self._previous[signum] = signal.signal(signum, _record_only)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._write_fd >= 0:
            signal.set_wakeup_fd(self._previous_fd)
            _write_close(self._write_fd)
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1

    def _watch(self) -> None:
        while True:
            data = os.read(self._read_fd, 64)
            for byte in data:
                if byte == _CLOSE[0]:
                    return
                if byte in self.signums:  # another signal with a Python handler also writes its byte
                    self._note(byte)

    def _note(self, signum: int) -> None:
        self.received.append(signum)
        name = _name(signum)
        if len(self.received) == 1:
            log.info("signal received, stopping: signal=%s", name)
            self.stop.set()
        else:
            log.info("signal received again, already stopping: signal=%s count=%d", name, len(self.received))


def _write_close(fd: int) -> None:
    """Tell the watcher to exit; a full pipe (the watcher is still draining a burst) is waited out."""
    while True:
        try:
            os.write(fd, _CLOSE)
            return
        except BlockingIOError:
            time.sleep(0.01)


def _record_only(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing. The C-level handler already wrote the wake-up byte."""


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
