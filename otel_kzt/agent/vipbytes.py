"""`kzt_agent_service_vip_bytes_total` (DESIGN §3a): the bytes this node's sockets sent to Service VIPs.

Only `cgroup` mode counts at the socket, before kube-proxy's DNAT, so only there is a destination a
Service's cluster IP (the other modes see the backend). The enricher names such a flow by its Service and
classes it `unknown` (the zone of the backend is not known at socket egress); this counter says how much
of the node's traffic that is, so a cluster where most of it is knows what the cgroup view leaves open.

A flow whose destination is a cluster IP when first seen stays a VIP flow until it leaves the map (the
Service may go while the connection lasts). The counter adds each VIP flow's growth per interval, and an
evicted flow's final value: whole for one never read before (begun and evicted between two reads, or
read while its Service was not listed yet). It is a process counter (its start is the agent's): a flow
the kernel first saw before this process started counts from its first snapshot here (what came before
was the previous process's run, reported then; bytes sent between that process's last read and this
one's first are not in either, nor is such a flow evicted before this one's first read). Destinations
are checked against the Services once per address and catalog generation.
"""

from __future__ import annotations

from typing import Protocol

from otel_kzt.agent.flows import FlowCounters, FlowKey, Snapshot
from otel_kzt.agent.local import address_text
from otel_kzt.k8s.servicemodel import ServiceRef


class VipCatalog(Protocol):
    """The part of `ServiceCatalog` this needs (k8s/servicemodel.py)."""

    @property
    def generation(self) -> int: ...

    def service_of_vip(self, address: str) -> ServiceRef | None: ...


class ServiceVipBytes:
    def __init__(self, catalog: VipCatalog, started_unix_ns: int) -> None:
        self._catalog = catalog
        self._started = started_unix_ns
        self._seen: dict[FlowKey, int] = {}  # VIP flow -> its bytes counted so far
        self._is_vip: dict[bytes, bool] = {}  # raw destination -> a cluster IP? (one catalog generation)
        self._generation = -1
        self.total = 0

    def observe(self, snapshot: Snapshot) -> int:
        """Adds this snapshot's growth of VIP flows (evicted ones' final values first); the total."""
        seen = self._seen
        if self._catalog.generation != self._generation or len(self._is_vip) > 4 * max(len(seen), 1024):
            # Asked afresh, but the destinations of VIP flows in the map stay VIPs (a Service deleted while
            # its connections last).
            self._is_vip = dict.fromkeys((key.dst for key in seen), True)
            self._generation = self._catalog.generation
        is_vip, catalog, started = self._is_vip, self._catalog, self._started
        for key, final in snapshot.evicted.items():
            if key in seen:
                self._add(key, final)
                del seen[key]
            elif self._vip(key.dst) and final.first_seen_unix_ns >= started:
                # Begun and evicted between two reads (or while its destination was not yet a listed
                # Service): its final value is all of it. One begun before this process is the restart gap.
                self.total += final.bytes
        total = self.total
        for key, counters in snapshot.flows.items():  # 100,000 flows an interval: checks inlined
            dst = key.dst
            vip = is_vip.get(dst)  # by destination first: a few hundred, where the flows are many
            if vip is None:
                vip = is_vip[dst] = catalog.service_of_vip(address_text(dst)) is not None
            if not vip:
                continue
            counted = seen.get(key)
            if counted is None:  # a new VIP flow: whole, unless the previous process saw its start
                counted = seen[key] = counters.bytes if counters.first_seen_unix_ns < started else 0
            if counters.bytes > counted:
                total += counters.bytes - counted
                seen[key] = counters.bytes
        self.total = total
        if len(seen) > len(snapshot.flows):
            for gone in [k for k in seen if k not in snapshot.flows]:
                del seen[gone]  # left the map without a final value here (the previous process evicted it)
        return self.total

    def _vip(self, dst: bytes) -> bool:
        vip = self._is_vip.get(dst)
        if vip is None:
            vip = self._is_vip[dst] = self._catalog.service_of_vip(address_text(dst)) is not None
        return vip

    def _add(self, key: FlowKey, counters: FlowCounters) -> None:
        """Cumulative values of one flow: the growth since the last. (A flow evicted and begun again under
        the same key arrives as a final value first, which ends the old one.)"""
        counted = self._seen[key]
        if counters.bytes > counted:
            self.total += counters.bytes - counted
            self._seen[key] = counters.bytes
