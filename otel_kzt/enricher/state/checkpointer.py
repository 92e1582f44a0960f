"""Writing and loading `--state-file`: atomic writes on their own timer and at shutdown, one load before
receiving, and the last snapshot written for /metrics.

What is in the file and how it is restored is checkpoint.py (and checkpoint_format.py); this is the file
and thread handling. /metrics serves the totals of the last checkpoint written (or loaded), never more: so
after a SIGKILL the restarted process never exposes less than was scraped (a drop would be a reset to
Prometheus), and a scrape writes nothing. A file that cannot be used is logged and counted
(kzt_enricher_checkpoint_errors{stage="load"}), never fatal: the counters then start from zero, as without
a state file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from otel_kzt.enricher.exporters.prometheus import HealthMetrics, Snapshot
from otel_kzt.enricher.state.checkpoint import State, StateError, gc_paused
from otel_kzt.enricher.state.checkpoint_format import decode, encode

log = logging.getLogger(__name__)


def write_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a torn one, also after a power cut."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)


class Stateful(Protocol):
    """What the checkpointer needs of the core."""

    def capture_state(self) -> State: ...

    def restore_state(self, state: State) -> int: ...


class Checkpointer:
    """Loads the state file once before the receivers start, then writes it every interval and on stop."""

    def __init__(
        self,
        path: str,
        core: Stateful,
        interval_s: float,
        health: HealthMetrics,
        *,
        families: frozenset[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path, self._core, self._interval_s, self._health = path, core, interval_s, health
        self._families, self._clock = families, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()  # the periodic and the final write never interleave
        # the totals of the last checkpoint written or loaded (none yet: every family empty)
        self._persisted: Snapshot = {name: {} for name in (*families, "agents")}

    def load(self) -> int:
        """Restore the file if there is a usable one; a bad one is logged and counted, never fatal."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            log.info("no state file at %s: counters start from zero", self.path)
            return 0
        except OSError as exc:
            return self._bad(f"cannot read: {exc.strerror}")
        try:
            state = decode(data, self._families)
            restored = self._core.restore_state(state)
        except StateError as exc:
            return self._bad(str(exc))
        self._persisted = _exposed(state)
        log.info(
            "state restored from %s: %d series, written %.1fs ago",
            self.path,
            restored,
            self._clock() - state.written,
        )
        return restored

    def _bad(self, why: str) -> int:
        self._health.checkpoint_errors.labels("load").inc()
        log.warning("state file %s ignored (counters start from zero): %s", self.path, why)
        return 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kzt-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.save()

    def persisted(self) -> Snapshot:
        """What /metrics shows: the totals of the last checkpoint on disk (a scrape writes nothing)."""
        return self._persisted

    def save(self) -> bool:
        """One checkpoint; a failure is logged and counted, the next interval tries again."""
        with self._write_lock:
            began = time.perf_counter()
            state = self._core.capture_state()
            copied = time.perf_counter()
            try:
                with gc_paused():
                    data = encode(state)
                write_atomic(self.path, data)
            except (OSError, ValueError) as exc:
                self._health.checkpoint_errors.labels("write").inc()
                log.warning("state checkpoint to %s failed: %s", self.path, exc)
                return False
            self._persisted = _exposed(state)
            self._health.checkpoint_timestamp.set(state.written)
            log.debug(
                "checkpoint: %d series, %d bytes, capture %.1fms, encode+write %.1fms",
                len(state.series),
                len(data),
                (copied - began) * 1e3,
                (time.perf_counter() - copied) * 1e3,
            )
            return True

    def shutdown(self) -> None:
        """Stop the timer and write the final state (the receivers are closed by now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.save()


def _exposed(state: State) -> Snapshot:
    return {**state.totals, "agents": {(n,): t for n, t in state.agents.items()}}
