"""The savings state of the enricher: every few seconds, the Services as routed and the billed-flow totals
go into `otel_kzt.savings.Engine`; its `Report` is what `/api/v1/savings`, the web view and the savings
gauges show.

Services and EndpointSlices are an addition: while the index cannot read them (not listed yet, or RBAC
refuses) the savings are off, said once in a warning and in `kzt_savings_enabled`, and nothing else of the
enricher depends on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final

from otel_kzt.k8s.model import MetadataIndex
from otel_kzt.k8s.servicemodel import ServiceCatalog, ServiceView
from otel_kzt.savings.engine import Engine
from otel_kzt.savings.history import Totals
from otel_kzt.savings.model import Report, ServiceKey, ServiceState

log = logging.getLogger(__name__)

SERVICE_RESOURCES: Final = ("services", "endpointslices")
NOT_LISTED: Final = "Services and EndpointSlices not listed yet"
NO_CATALOG: Final = "this metadata source has no Services"
MAX_STEP_S: Final = 5.0  # how late a routing change is noticed at most


class SavingsTracker:
    """Feeds the engine from the index and the counters; `step()` once, or `start()` a thread."""

    def __init__(
        self,
        index: MetadataIndex,
        totals: Callable[[], Totals],
        window_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._index = index
        self._catalog: ServiceCatalog | None = getattr(index, "services", None)
        self._totals = totals
        self._clock = clock
        self._engine = Engine(window_s)
        self.interval_s = min(MAX_STEP_S, self._engine.history.tick_s)
        self._lock = threading.Lock()
        self._views: tuple[ServiceView, ...] = ()
        self._report = self._engine.report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: tuple[bool, str] | None = None

    @property
    def report(self) -> Report:
        with self._lock:
            return self._report

    def views(self) -> tuple[ServiceView, ...]:
        """The Services as of the last step (empty while the savings are off)."""
        with self._lock:
            return self._views

    def change_times(self) -> Mapping[ServiceKey, float]:
        with self._lock:
            return {k: c.at for k, c in self._engine.changes.changes().items()}

    def step(self) -> Report:
        now = self._clock()
        catalog = self._catalog
        views: tuple[ServiceView, ...] = ()
        services: dict[ServiceKey, ServiceState] | None = None
        reason = ""
        version = None
        if catalog is not None and catalog.available():
            views = catalog.services()
            services = {(v.ref.namespace, v.ref.name): ServiceState.of(v) for v in views}
            version = catalog.cluster_version()
        else:
            reason = self._reason()
        totals = self._totals()
        with self._lock:
            self._report = report = self._engine.update(now, services, totals, version, reason)
            self._views = views
        self._say(report)
        return report

    def _reason(self) -> str:
        if self._catalog is None:
            return NO_CATALOG
        sync_state = getattr(self._index, "sync_state", None)
        if sync_state is not None:
            failing = [f.describe() for f in sync_state().failures if f.resource in SERVICE_RESOURCES]
            if failing:
                return "; ".join(failing)
        reason: Callable[[], str] | None = getattr(self._catalog, "reason", None)  # ServiceIndex.reason
        return (reason() if reason is not None else "") or NOT_LISTED

    def _say(self, report: Report) -> None:
        """Log when the savings turn on, or off for a new reason (not at every step)."""
        said = (report.enabled, report.reason)
        if said == self._said:
            return
        if report.enabled:
            log.info("savings on: Services and EndpointSlices readable window_s=%.0f", report.window_seconds)
        elif self._said is not None or report.reason != NOT_LISTED:  # not merely still starting
            log.warning("savings off (the enricher stays ready on pods and nodes): %s", report.reason)
        self._said = said

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kzt-savings", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            try:
                self.step()
            except Exception:
                log.exception("savings step failed; the last report stays")
            if self._stop.wait(self.interval_s):
                return
