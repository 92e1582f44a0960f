"""The agent's interval loop: snapshot the flow map, keep the local flows, encode, export, evict idle flows.

One pass (`export_once`) per interval. No request is queued between passes: a pass that cannot deliver
before the next tick gives up, and the next snapshot, whose cumulative values include everything, replaces
it. (The one thing kept across passes is the final values of evicted flows, below: no later snapshot has
them.)

Idle flows: a flow whose last packet is older than the idle timeout is exported; once that export was
delivered it is evicted from the kernel map. Packets may still arrive between that export's read and the
eviction: the datapath's evict loses none of them and hands the flow's final cumulative value to the next
snapshot (`Snapshot.evicted`). That final value is exported on the same series (same attributes, same start
time) ahead of the live flows, so a consumer that sees a new series of the same key afterwards has already
taken the old one's last increment; then the flow is forgotten (a flow that sends again comes back as a new
series with a new start time). A final value whose export fails is kept and sent again every interval
until delivered: cumulative, so sending it twice adds nothing. The store is bounded (both flow maps' size);
what does not fit is given up, counted and logged. The export on shutdown evicts nothing: the final values
would die with the process, while flows left in the pinned map reach the next one. Flows that are not ours
(forwarded, arriving) are evicted without export at the interval they are first seen (LocalFlows.leaves_now),
so forwarded traffic on a busy node never pushes local flows into the overflow bucket.

A pass that raises what nothing translated (a bug in encoding, a sender's own error) does not end the loop:
it counts as one failed export, is logged once per kind (`otel_kzt.ratelog`), and the next pass, whose
snapshot is cumulative, carries everything; the datapath and the state kept across passes stay (the finals
a snapshot handed over are held before anything can raise, and stored all or nothing). A datapath
error that gets this far, and KeyboardInterrupt / SystemExit, still end the process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from itertools import compress
from operator import attrgetter, is_not, not_
from typing import Protocol, cast

from otel_kzt import __version__, schema
from otel_kzt.agent.config import AgentConfig
from otel_kzt.agent.coverage import Counted, CoverageCheck
from otel_kzt.agent.encode import AttrValue, PointHead, RequestEncoder
from otel_kzt.agent.export import ExportResult
from otel_kzt.agent.flows import DeviceCounts, FlowCounters, FlowKey, FlowReader, Snapshot
from otel_kzt.agent.health import AgentReport, Health, map_fill_ratio, metadata_state
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.telemetry import AgentStats, telemetry_metrics
from otel_kzt.agent.vipbytes import ServiceVipBytes
from otel_kzt.errors import DatapathError
from otel_kzt.k8s.model import MetadataIndex
from otel_kzt.ratelog import KindLog

log = logging.getLogger(__name__)

SCOPE_NAME = "otel-kzt/agent"


_IS_NOT_NONE = partial(is_not, None)
_LAST_SEEN, _BYTES, _SOURCE_POD = (
    attrgetter("last_seen_unix_ns"),
    attrgetter("bytes"),
    attrgetter("source_pod"),
)


class FlowSource(FlowReader, Protocol):
    """The datapath as the loop uses it: read cumulative counters, evict idle flows."""

    def evict(self, keys: Iterable[FlowKey]) -> int: ...


class DeviceSource(Protocol):
    """The datapath's devices followed every interval (tc mode: tcwatch.py); None in the other modes."""

    def rescan_devices(self) -> DeviceCounts | None: ...


class Sender(Protocol):
    def export(self, requests: Iterable[bytes], deadline: float, stop: threading.Event) -> ExportResult: ...


def resource_attributes(config: AgentConfig, host_name: str) -> dict[str, AttrValue]:
    resource: dict[str, AttrValue] = {
        schema.SERVICE_NAME: schema.AGENT_SERVICE_NAME,
        schema.SERVICE_VERSION: __version__,
        schema.RESOURCE_NODE_NAME: config.node_name,
        schema.HOST_NAME: host_name,
    }
    if config.cluster_name:
        resource[schema.CLUSTER_NAME] = config.cluster_name
    return resource


def _from_base(
    rebased: tuple[PointHead, FlowCounters, bool], counters: FlowCounters
) -> tuple[PointHead, FlowCounters]:
    """A flow's point on its run begun at a receiver switch: the values since the switch."""
    head, base, _ = rebased
    return head, replace(counters, bytes=counters.bytes - base.bytes, packets=counters.packets - base.packets)


def _held(
    prior: tuple[list[FlowKey], list[FlowCounters]] | None,
    flows: dict[FlowKey, FlowCounters],
    ours: _Ours,
    held: list[tuple[int, int]] | None,
) -> tuple[list[FlowKey], list[FlowCounters]]:
    """What the receiver may hold after an export, as lists. `held` None: every request of it (the usual
    case): every flow of the snapshot at its value now, ours' own lists when it holds them all. Else the
    ranges of ours the receiver may hold: those at their value now, the others at what it held before (an
    export split into requests that ended part-way: a flow whose request never reached it was not counted
    there, and a move must begin its new run where that receiver stopped, not where it would have)."""
    if held is None:
        if len(ours.keys) == len(flows):  # every flow, in the snapshot's order
            return ours.keys, ours.counts
        return list(flows), list(flows.values())
    values = dict(zip(*prior, strict=True)) if prior is not None else {}
    for start, end in held:
        values.update(zip(ours.keys[start:end], ours.counts[start:end], strict=True))
    kept = [key for key in values if key in flows]  # bounded by the map: flows gone leave
    return kept, [values[key] for key in kept]


def _held_ranges(ends: list[int], held: list[bool], offset: int, total: int) -> list[tuple[int, int]] | None:
    """The ranges of ours (points after `offset` finals, of `total`) in the requests a receiver may hold;
    None when it may hold every request. `ends`: the end in the points of each request built (an export
    that stopped at a switch built no more), `held` per request sent."""
    if ends[-1:] == [total] and len(held) == len(ends) and all(held):
        return None
    ranges, start = [], 0
    for end, kept in zip(ends, held, strict=False):  # requests not reached after a switch: not held
        if kept and end > offset:
            ranges.append((max(start, offset) - offset, end - offset))
        start = end
    return ranges


@dataclass(slots=True)
class _Ours:
    """This pass's flows to export, as parallel lists (key, head, counters): no tuple per flow."""

    keys: list[FlowKey]
    heads: list[PointHead]
    counts: list[FlowCounters]

    def clear(self) -> None:
        self.keys.clear()
        self.heads.clear()
        self.counts.clear()


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        source: FlowSource,
        sender: Sender,
        local: LocalFlows,
        index: MetadataIndex | None,
        *,
        host_name: str,
        clock_ns: Callable[[], int] = time.time_ns,
        health: Health | None = None,
        datapath: str = "netfilter",
        coverage: CoverageCheck | None = None,
        vips: ServiceVipBytes | None = None,
        devices: DeviceSource | None = None,
    ) -> None:
        self._config = config
        self.health = health or Health(config.interval_s)
        self._datapath = datapath
        self._coverage = coverage  # the blind-datapath check (agent/coverage.py), when configured
        self._counted = Counted()
        self._vips = vips  # bytes to Service VIPs (agent/vipbytes.py), where the mode sees VIPs (cgroup)
        self._source = source
        self._devices = devices  # re-scanned every pass, before the snapshot
        self._device_counts: DeviceCounts | None = None
        self._device_errors = KindLog(log)
        self._sender = sender
        self._local = local
        self._index = index
        self._clock_ns = clock_ns
        self.stats = AgentStats(clock_ns())
        self._pass_errors = KindLog(log)
        # Final values of evicted flows not yet delivered, oldest first: (key, start) -> (head, counters).
        self._finals: dict[tuple[FlowKey, int], tuple[PointHead, FlowCounters]] = {}
        # Evicted flows' final counters as snapshots handed them over, not yet in `_finals` (a pass that
        # raised in between leaves them for the next one; see _take_finals).
        self._handed: list[dict[FlowKey, FlowCounters]] = []
        # The flows of the last export handed to the receiver, delivered or not (what it may hold: an
        # answer can time out after the receiver counted; as lists of keys and counters: the snapshot's
        # dict, ~5 MB at 100,000 flows, would stay through the next snapshot and export; None: nothing
        # handed over yet), and the runs begun at a receiver switch: key -> (head
        # starting at the switch, the values the receiver left held, whether the new run reached a
        # receiver: the flow is then evicted, its final value sent on that run).
        self._delivered: tuple[list[FlowKey], list[FlowCounters]] | None = None
        self._rebased: dict[FlowKey, tuple[PointHead, FlowCounters, bool]] = {}
        self._unsent: set[FlowKey] = set()  # flows evicted at a switch with no known base: finals unsent
        self._sent_since_move = (
            False  # an export was sent since the last switch: runs begun there may be held
        )
        self.left_behind_bytes = 0  # bytes of old runs counted by receivers this agent moved away from
        self._encoder = RequestEncoder(
            resource_attributes(config, host_name),
            SCOPE_NAME,
            __version__,
            max_points=config.otlp.max_points_per_request,
            max_bytes=config.otlp.max_request_bytes,
        )

    def export_once(self, deadline: float, stop: threading.Event, *, evict: bool = True) -> ExportResult:
        """One interval: snapshot -> local flows -> requests -> export -> evict what went idle.

        `evict=False` (the export on shutdown): an eviction now would hand final values to a process
        that is about to exit; left in the (pinned) map, the next process exports and evicts them."""
        started = time.monotonic()
        self._rescan_devices()
        if self._coverage is not None:
            self._coverage.sample()  # the devices' counters, read as close to the snapshot as can be
        try:
            snapshot = self._source.snapshot()
        except DatapathError as exc:
            log.error("cannot read the flow map: error=%s", exc)
            return ExportResult(failed=1)
        if snapshot.evicted:  # the datapath has let go of these: held before anything else can raise
            self._handed.append(snapshot.evicted)
        self._local.refresh()
        self._take_finals(snapshot.capacity)  # before heads(): the final value reuses the flow's cached head
        all_heads = self._local.heads(snapshot.flows)
        idle_before = snapshot.taken_unix_ns - int(self._config.idle_timeout_s * 1e9)
        # Split by C loops (compress over the heads, None: not ours), no Python loop over 100,000 flows;
        # only the flows not ours are looked at one by one.
        flows = snapshot.flows
        mine = list(map(_IS_NOT_NONE, all_heads))
        own_heads = cast(list[PointHead], list(compress(all_heads, mine)))  # the heads that are not None
        ours = _Ours(list(compress(flows, mine)), own_heads, list(compress(flows.values(), mine)))
        idle_ours = list(compress(ours.keys, map(idle_before.__gt__, map(_LAST_SEEN, ours.counts))))
        idle_other = [
            key
            for key, counters in compress(flows.items(), map(not_, mine))
            if counters.last_seen_unix_ns < idle_before or self._local.leaves_now(key, counters)
        ]  # not ours: out of the map, it must not push ours into overflow
        pod_bytes = sum(map(_BYTES, compress(ours.counts, map(_SOURCE_POD, ours.heads))))
        all_bytes = sum(map(_BYTES, flows.values()))  # for the blind-datapath check
        del mine, all_heads
        self._counted.pods, self._counted.everything = pod_bytes, all_bytes
        report = self._report(snapshot)
        for move in range(3):  # a receiver switch begins new runs, then the export goes to the new one
            heads, counts = self._points(ours)
            exported = len(heads)  # heads may be ours' own list, which a receiver switch clears
            extra = telemetry_metrics(
                report,
                self.stats.view(),
                self.stats.started_unix_ns,
                snapshot.taken_unix_ns,
                exported=exported,
                datapath_started_unix_ns=snapshot.started_unix_ns,
            )
            ends: list[int] = []
            requests = self._encoder.encode(heads, counts, snapshot.taken_unix_ns, extra, ends)
            result = self._sender.export(requests, deadline, stop)
            if result.reached:  # answered or not (a late answer after it counted): the receiver may hold it
                held = _held_ranges(ends, result.held, exported - len(ours.keys), exported)  # finals first
                self._delivered = _held(self._delivered, snapshot.flows, ours, held)
                self._sent_since_move = True
            if not result.switched:
                break
            # each move of a pass begins runs of their own: 2 ns apart, as head_at may add one
            self._begin_new_runs(snapshot.taken_unix_ns + 2 * move, ours)
        duration = time.monotonic() - started
        self.stats.record_export(result.sent, result.failed, result.rejected_points, duration)
        self._publish(report, result)
        log.info(
            "export: flows=%d local=%d sent=%d failed=%d duration_s=%.3f",
            len(snapshot.flows),
            exported,
            result.sent,
            result.failed,
            duration,
        )
        rebased: list[FlowKey] = []
        if result.failed == 0 and not result.switched:
            self._finals.clear()  # delivered; on any failure all are sent again (idempotent)
            rebased = [k for k, (_, _, done) in self._rebased.items() if not done]
            for key in rebased:
                self._rebased[key] = (*self._rebased[key][:2], True)
        self.stats.record_finals(len(self._finals), 0)
        # A local flow's value must have reached the receiver before it is evicted; a renamed one leaves
        # after its last value under the old names (its next packets begin a new run, LocalFlows); one
        # whose run began at a receiver switch leaves once that run reached the new receiver.
        if evict:
            delivered = idle_ours + self._local.renamed() + rebased if result.failed == 0 else []
            self._evict(idle_other + delivered + list(self._unsent))
        return result

    def _points(self, ours: _Ours) -> tuple[list[PointHead], list[FlowCounters]]:
        """This export's points: the finals first (a new series of the same key in this export must come
        after the old one's end), then every flow of ours, on its run begun at a receiver switch if any.
        Without either (the steady state) ours' own lists, not a copy: 100,000 flows."""
        if not self._finals and not self._rebased:
            return ours.heads, ours.counts
        heads: list[PointHead] = [head for head, _ in self._finals.values()]
        counts: list[FlowCounters] = [counters for _, counters in self._finals.values()]
        rebased = self._rebased
        for key, head, counters in zip(ours.keys, ours.heads, ours.counts, strict=True):
            point = _from_base(rebased[key], counters) if rebased and key in rebased else (head, counters)
            heads.append(point[0])
            counts.append(point[1])
        return heads, counts

    def _begin_new_runs(self, switch_unix_ns: int, ours: _Ours) -> None:
        """The exporter is moving to another receiver (export.py), which must not count what the one it
        leaves counted: each flow that receiver may hold a value of begins a new run (start = the switch,
        values from the last sent to it, answered or not); flows it never got count whole at the new one.
        After the new runs' first delivery their flows leave the kernel map: their next packets are new
        flows, whose starts survive an agent restart. Finals not yet delivered stay with the receiver left
        (its last values)."""
        log.warning(
            "receiver changed: new runs begin where the previous receiver stopped: flows=%d", len(ours.keys)
        )
        self._finals.clear()
        if self._delivered is None:
            # This process handed nothing over yet (it started on a receiver that is gone): what that
            # receiver holds is not known here. Nothing of the old runs goes to the new one: the flows
            # leave the kernel map unsent, and their next packets begin new runs.
            self._unsent.update(ours.keys)
            ours.clear()
            return
        delivered = dict(zip(*self._delivered, strict=True))
        sent, self._sent_since_move = self._sent_since_move, False
        for key, counters in zip(ours.keys, ours.counts, strict=True):
            base = delivered.get(key)
            begun = self._rebased.get(key)  # a run begun at an earlier switch
            if begun is not None and not begun[2] and not sent:
                continue  # its new run was sent to no receiver yet: it stays as it is
            if base is None or base.first_seen_unix_ns != counters.first_seen_unix_ns:
                self._rebased.pop(key, None)  # never at the previous receiver: counted whole
                continue
            head = self._local.head_at(key, switch_unix_ns)
            if head is not None:
                self._rebased[key] = (head, base, False)
                # the receiver left holds the run from the earlier switch's base, if one was begun
                self.left_behind_bytes += base.bytes - (begun[1].bytes if begun is not None else 0)

    def _take_finals(self, capacity: int) -> None:
        """Adds the handed-over evicted flows that are ours to the finals to export, within the bound.

        All or nothing: everything is worked out first and stored at the end, where nothing can raise, so
        a pass that raises in between leaves `_handed` (and the runs begun at a switch) as they were and
        the next pass takes them again (a head popped from the cache is built again, the same series)."""
        if not self._handed:
            return
        finals: dict[tuple[FlowKey, int], tuple[PointHead, FlowCounters]] = {}
        unsent: set[FlowKey] = set()
        ended: list[FlowKey] = []  # runs begun at a switch that these finals end
        pod_bytes = all_bytes = 0
        for evicted in self._handed:
            gone = self._unsent.intersection(evicted)
            unsent |= gone
            for key, cached in self._local.final_heads(evicted).items():
                if key in gone:
                    continue  # an old run whose receiver is gone (_begin_new_runs)
                rebased = self._rebased.get(key)
                final = (cached, evicted[key]) if rebased is None else _from_base(rebased, evicted[key])
                if rebased is not None:
                    ended.append(key)
                finals[(key, final[0].start_unix_ns)] = final
                if cached.source_pod:
                    pod_bytes += evicted[key].bytes
            all_bytes += sum(c.bytes for c in evicted.values())
        self._handed.clear()
        self._unsent -= unsent
        for key in ended:
            self._rebased.pop(key, None)
        self._finals.update(finals)
        self._counted.evicted_pods += pod_bytes
        self._counted.evicted_everything += all_bytes
        limit = max(1, 2 * capacity)  # IPv4 and IPv6 maps
        dropped = len(self._finals) - limit
        if dropped > 0:
            for old in list(self._finals)[:dropped]:
                del self._finals[old]
            log.warning(
                "final values of evicted flows given up undelivered: dropped=%d limit=%d", dropped, limit
            )
        self.stats.record_finals(len(self._finals), max(0, dropped))

    def _rescan_devices(self) -> None:
        """Hook the devices that appeared, unhook those gone. Whatever fails here (the datapath logs and
        retries its own errors) costs this pass nothing but the re-scan: the counts stay the last ones."""
        if self._devices is None:
            return
        try:
            self._device_counts = self._devices.rescan_devices()
        except Exception as exc:
            self._device_errors.error(exc, "datapath devices not re-scanned; tried again next interval")

    def _report(self, snapshot: Snapshot) -> AgentReport:
        """This pass's numbers, as the telemetry in its export carries them (exports counted so far)."""
        view = self.stats.view()
        synced = metadata_state(self._index)[0]
        coverage = None
        if self._coverage is not None:
            ratio = self._coverage.observe_counted(self._counted, snapshot.overflow_bytes, synced)
            coverage = None if math.isnan(ratio) else ratio
        return AgentReport(
            flows_tracked=len(snapshot.flows),
            map_fill_ratio=map_fill_ratio(snapshot),
            overflow_bytes=snapshot.overflow_bytes,
            overflow_packets=snapshot.overflow_packets,
            exports_ok=view.exports_ok,
            exports_failed=view.exports_failed,
            metadata_synced=synced,
            datapath=self._datapath,
            coverage_ratio=coverage,
            service_vip_bytes=self._vips.observe(snapshot) if self._vips is not None else None,
            devices=self._device_counts,
        )

    def _publish(self, report: AgentReport, result: ExportResult) -> None:
        """The agent's own /metrics and readiness after this pass's export."""
        ok, failed = report.exports_ok + result.sent, report.exports_failed + result.failed
        self.health.publish(replace(report, exports_ok=ok, exports_failed=failed))
        if result.sent and not result.failed:
            self.health.delivered()

    def _evict(self, keys: list[FlowKey]) -> None:
        if not keys:
            return
        try:
            evicted = self._source.evict(keys)
        except DatapathError as exc:
            log.error("cannot evict idle flows: count=%d error=%s", len(keys), exc)
            return
        self.stats.record_evicted(evicted)
        log.debug("evicted idle flows: asked=%d evicted=%d", len(keys), evicted)

    def _pass(self, deadline: float, stop: threading.Event, *, evict: bool = True) -> ExportResult:
        """`export_once`, surviving any Exception but a DatapathError: one failed export (see the top)."""
        started = time.monotonic()
        try:
            return self.export_once(deadline, stop, evict=evict)
        except DatapathError:
            raise  # the flow map is gone: nothing left to export from
        except Exception as exc:
            self.stats.record_export(0, 1, 0, time.monotonic() - started)
            self._pass_errors.error(exc, "export pass failed; the next one carries the cumulative totals")
            return ExportResult(failed=1)

    def run(self, stop: threading.Event) -> None:
        """Export every interval until `stop` is set, then one final export (no retries)."""
        interval = self._config.interval_s
        tick = time.monotonic() + interval
        self.health.loop_ran()  # /healthz judges the loop from here on
        while not stop.wait(max(0.0, tick - time.monotonic())):
            # Retries of this pass end where the next pass begins: the next snapshot supersedes this one.
            self._pass(tick + interval, stop)
            self.health.loop_ran()
            tick = max(tick + interval, time.monotonic())
        final = self._pass(time.monotonic() + self._config.otlp.timeout_s, stop, evict=False)
        log.info("final export on shutdown: sent=%d failed=%d", final.sent, final.failed)
        if self._finals:
            # Their flows are gone from the kernel map: these values exist only in this process.
            log.warning(
                "final values of evicted flows not delivered before exit: flows=%d", len(self._finals)
            )
