"""Counters over time: what moved in the last window, and a Service's traffic before and after a change.

The enricher's billed-flow counters only go up; rates over `--savings-window` need their values a window
ago. `History` keeps one copy of them per tick (a window holds at most `MAX_SNAPSHOTS + 1`), so memory is
bounded by the flows billed in a window, not by time. `ChangeLog` records when a Service's routing or the
zones of its ready endpoints change, freezes the window before, and measures the time after.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from otel_kzt.savings.model import Change, FlowKey, Period, ServiceKey, ServiceState, service_of

MAX_SNAPSHOTS: Final = 60  # ticks per window
MIN_TICK_S: Final = 1.0

Values = tuple[float, float]  # (bytes, usd), cumulative
Totals = Mapping[FlowKey, Values]


def increase(now: Values, then: Values | None) -> Values:
    """What a counter pair added since `then`; one that went down restarted from zero (as `rate` reads it)."""
    if then is None:
        return now
    b = now[0] - then[0] if now[0] >= then[0] else now[0]
    u = now[1] - then[1] if now[1] >= then[1] else now[1]
    return (b, u)


class History:
    """Snapshots of cumulative totals, one per tick, reaching one window back."""

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window must be positive, got {window_s!r}")
        self.window_s = window_s
        self.tick_s = max(MIN_TICK_S, window_s / MAX_SNAPSHOTS)
        self._snapshots: deque[tuple[float, dict[FlowKey, Values]]] = deque()
        self._latest: tuple[float, dict[FlowKey, Values]] | None = None

    def add(self, now: float, totals: Totals) -> None:
        """Record the totals as of `now` (kept as a snapshot when a tick has passed since the last one)."""
        copy = dict(totals)
        self._latest = (now, copy)
        if not self._snapshots or now - self._snapshots[-1][0] >= self.tick_s:
            self._snapshots.append((now, copy))
        # Keep one snapshot at or before now - window: the baseline of a full window.
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - self.window_s:
            self._snapshots.popleft()

    def baseline(self, at: float) -> tuple[float, dict[FlowKey, Values]] | None:
        """The newest snapshot taken at or before `at`, else the oldest one kept."""
        best = None
        for snap in self._snapshots:
            if snap[0] <= at or best is None:
                best = snap
            if snap[0] > at:
                break
        return best

    def window(self) -> tuple[float, float, dict[FlowKey, Values]]:
        """(start, end, increases) over the last window, as far as it was seen."""
        if self._latest is None:
            return (0.0, 0.0, {})
        end, latest = self._latest
        base = self.baseline(end - self.window_s)
        start, then = base if base is not None else (end, {})
        deltas = {k: increase(v, then.get(k)) for k, v in latest.items()}
        return (start, end, {k: d for k, d in deltas.items() if d[0] > 0 or d[1] > 0})

    @property
    def snapshots(self) -> int:
        return len(self._snapshots)


def by_service(totals: Totals) -> dict[ServiceKey, Values]:
    """Billed-flow totals summed per Service (flows of no Service left out)."""
    out: dict[ServiceKey, list[float]] = {}
    for key, (b, u) in totals.items():
        service = service_of(key)
        if service is not None:
            cell = out.setdefault(service, [0.0, 0.0])
            cell[0] += b
            cell[1] += u
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass(slots=True)
class _Open:
    """A change being measured: the totals at its moment, and the after-period once a window passed."""

    change: Change
    totals_at: Values
    frozen: bool = False


class ChangeLog:
    """Per Service: its last routing signature and its last recorded change."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._signatures: dict[ServiceKey, tuple[str, frozenset[str]]] = {}
        self._changes: dict[ServiceKey, _Open] = {}

    def observe(
        self,
        now: float,
        services: Mapping[ServiceKey, ServiceState],
        totals: Mapping[ServiceKey, Values],
        before: Mapping[ServiceKey, Period],
    ) -> list[ServiceKey]:
        """Record changes (returns the Services that changed now) and move the after-periods on.

        `totals`: each Service's cumulative billed traffic now; `before`: its window up to now.
        """
        changed = []
        for key, state in services.items():
            signature = state.signature()
            old = self._signatures.get(key)
            self._signatures[key] = signature
            if old is not None and old != signature:
                changed.append(key)
                period = before.get(key, Period(now - self.window_s, now, 0.0, 0.0))
                change = Change(
                    now,
                    old[0],
                    signature[0],
                    tuple(sorted(old[1])),
                    tuple(sorted(signature[1])),
                    period,
                    Period(now, now, 0.0, 0.0),
                )
                self._changes[key] = _Open(change, totals.get(key, (0.0, 0.0)))
        for key in [k for k in self._signatures if k not in services]:
            del self._signatures[key]  # the Service is gone (its last change stays until replaced)
        for key, entry in self._changes.items():
            if not entry.frozen:
                self._advance(entry, now, totals.get(key, entry.totals_at))
        return changed

    def _advance(self, entry: _Open, now: float, total: Values) -> None:
        at = entry.change.at
        b, u = increase(total, entry.totals_at)
        end = min(now, at + self.window_s)
        entry.change = dataclasses.replace(entry.change, after=Period(at, end, b, u))
        entry.frozen = now >= at + self.window_s  # one window after the change is all the report shows

    def changes(self) -> dict[ServiceKey, Change]:
        return {k: e.change for k, e in self._changes.items()}

    def last_change(self, key: ServiceKey) -> float:
        entry = self._changes.get(key)
        return entry.change.at if entry is not None else math.nan
