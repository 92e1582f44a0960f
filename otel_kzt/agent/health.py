"""The agent's health: what `/healthz`, `/readyz` and its own `/metrics` judge (DESIGN §2, §4).

- alive (`/healthz`): the interval loop completed a pass within the last 3 intervals. Before the first
  pass (the datapath still loading) the agent counts as alive: start-up has its own timeout (the loader's).
- ready (`/readyz`): every check passes: the datapath is attached, metadata is synced, an export was
  delivered within the last 3 intervals, plus any check another part added (`add_check`, seam 4).
  Not ready answers 503 with one failing check a line.

The interval loop writes, the HTTP server's threads read. Nothing here takes a lock the loop could hold:
the loop replaces whole immutable values (`publish`, `loop_ran`), so a loop stuck anywhere (a datapath
read that never returns) leaves the endpoints answering, and answering that it is stuck.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Final

from otel_kzt import schema
from otel_kzt.agent.flows import AF_INET, AF_INET6, DeviceCounts, Snapshot
from otel_kzt.k8s.model import MetadataIndex, sync_summary

STALE_INTERVALS: Final = 3
Check = Callable[[], str | None]  # None: passes; else why not, in one line


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What one pass of the interval loop saw: the numbers of the agent's own metrics."""

    flows_tracked: int
    map_fill_ratio: float  # the fuller of the IPv4 and IPv6 maps: flows / capacity
    overflow_bytes: int
    overflow_packets: int
    exports_ok: int
    exports_failed: int
    metadata_synced: bool
    datapath: str  # the mode counting (`netfilter`, `tc`, `cgroup`)
    coverage_ratio: float | None = None  # counted / pod interface bytes, where the mode measures it
    service_vip_bytes: int | None = None  # bytes sent to Service VIPs (cgroup mode)
    devices: DeviceCounts | None = None  # the devices counted at (tc mode), followed while running


_FAMILY = attrgetter("family")


def map_fill_ratio(snapshot: Snapshot) -> float:
    """Each address family has its own map of `capacity` entries: the fuller one is what fills up."""
    if not snapshot.capacity:
        return 0.0
    per_family = Counter(map(_FAMILY, snapshot.flows))  # counted in C: 100,000 keys per interval
    return max(per_family.get(AF_INET, 0), per_family.get(AF_INET6, 0)) / snapshot.capacity


def device_changes(devices: DeviceCounts) -> list[tuple[str, int]]:
    """(change, count) for every `schema.DEVICE_CHANGES` value, in that order."""
    counts = (devices.added, devices.removed, devices.covered)
    return list(zip(schema.DEVICE_CHANGES, counts, strict=True))


def metadata_state(index: MetadataIndex | None) -> tuple[bool, str]:
    """(synced, one line saying why not): the same answer for /readyz and kzt_agent_metadata_synced
    (the index's sync state: a 401/403 on pods or nodes, now, is not synced and names the resource)."""
    return sync_summary(index)


class Health:
    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self.report: AgentReport | None = None  # the last pass's numbers (None before the first)
        self._loop_at: float | None = None  # when the loop last completed a pass
        self._delivered_at: float | None = None  # when an interval's export was last delivered whole
        self._checks: dict[str, Check] = {}

    # --- written by the loop (one attribute store each: never blocks a reader) ------------------------

    def loop_ran(self) -> None:
        self._loop_at = self._clock()

    def delivered(self) -> None:
        self._delivered_at = self._clock()

    def publish(self, report: AgentReport) -> None:
        self.report = report

    def add_check(self, name: str, check: Check) -> None:
        """A readiness check (set up before the loop starts); `check()` must not block."""
        self._checks = {**self._checks, name: check}

    # --- read by the endpoints --------------------------------------------------------------------------

    def alive(self) -> tuple[bool, str]:
        limit = STALE_INTERVALS * self.interval_s
        ran = self._loop_at
        if ran is None:
            return True, "starting: the interval loop has not run yet"
        ago = self._clock() - ran
        if ago > limit:
            return False, f"interval loop stuck: last pass {ago:.1f}s ago (limit {limit:g}s = 3 intervals)"
        return True, f"interval loop ran {ago:.1f}s ago"

    def ready(self) -> tuple[bool, list[str]]:
        """(ready, failing checks) over the built-in checks and those added."""
        failing = [f"{name}: {why}" for name, check in self._checks.items() if (why := check()) is not None]
        delivered = self._export_problem()
        if delivered is not None:
            failing.append(f"export: {delivered}")
        return not failing, failing

    def _export_problem(self) -> str | None:
        limit = STALE_INTERVALS * self.interval_s
        at = self._delivered_at
        if at is None:
            return "no export delivered yet"
        ago = self._clock() - at
        if ago > limit:
            return f"last export delivered {ago:.1f}s ago (limit {limit:g}s = 3 intervals)"
        return None
