"""`ServiceIndex`: the `ServiceCatalog` (servicemodel.py) fed by the file source or list/watch.

Writers (`upsert_*`, `delete_*`, `replace`) hold one lock; readers never lock: each (address, protocol)
maps to an immutable tuple of `(port, Service, released_at)` that writers swap in whole. An endpoint that
leaves every slice keeps answering for `grace_s` after it left (late points, as the pod index does).

Services are an addition to pods and nodes: the index answers only while every source that registered
here has listed once and none is refused now (`available()`); `reason()` says why not, for the warning
and `/api/v1/savings`. The change time of a Service's routing or of its ready endpoints' zones is kept
(`ServiceView.changed_unix_s`).

A Service's cluster IPs (its VIPs) name it too (`service_of_vip`): what a socket addresses before
kube-proxy's DNAT, which the agent's `cgroup` mode counts (DESIGN §3a). A cluster IP belongs to one
Service at a time, so the address alone decides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from otel_kzt.k8s.servicedecode import ServiceRecord, SliceRecord
from otel_kzt.k8s.servicemodel import (
    ClusterVersion,
    ServiceEndpoint,
    ServiceRef,
    ServiceView,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_ENDPOINTS = 2_000_000  # (address, port) entries; far above any cluster, counted when reached

_Entry = tuple[int | None, ServiceRef, float | None]  # (target port or None = every port, Service, released)
_Key = tuple[str, str]  # (canonical address, protocol upper-case)


class ServiceIndex:
    """Implements `otel_kzt.k8s.servicemodel.ServiceCatalog`."""

    def __init__(
        self,
        node_zone: Callable[[str], str | None] = lambda name: None,
        grace_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
    ) -> None:
        self._node_zone = node_zone
        self._grace_s = grace_s
        self._clock = clock
        self._max_endpoints = max_endpoints
        self._lock = threading.Lock()
        self._services: dict[ServiceRef, ServiceRecord] = {}
        self._slices: dict[tuple[str, str], SliceRecord] = {}
        self._of: dict[ServiceRef, set[tuple[str, str]]] = {}  # the slices of each Service
        self._listed: dict[_Key, Counter[tuple[int | None, ServiceRef]]] = {}  # writer side, refcounts
        self._entry_count = 0
        self._answers: dict[_Key, tuple[_Entry, ...]] = {}  # reader side
        self._vips: dict[str, ServiceRef] = {}  # cluster IP -> its Service (reader side, item by item)
        self._signatures: dict[ServiceRef, tuple[str, frozenset[str]]] = {}
        self._changed: dict[ServiceRef, float] = {}
        self._sources: dict[str, bool] = {}
        self._failures: dict[str, str] = {}  # source -> why it is refused now
        self._version: ClusterVersion | None = None
        self._generation = 0
        self._views: tuple[int, tuple[ServiceView, ...]] = (-1, ())
        self.endpoints_dropped = 0  # (address, port) entries refused by the cap (counted, and logged)

    # --- ServiceCatalog --------------------------------------------------------------------------------

    def available(self) -> bool:
        return bool(self._sources) and all(self._sources.values()) and not self._failures

    def reason(self) -> str:
        """Why the Services are refused now ("" when available, or merely not listed yet)."""
        with self._lock:  # writers (the sources' threads) add and drop failures
            if not self._sources:
                return "no source of Services"
            return "; ".join(self._failures[name] for name in sorted(self._failures))

    @property
    def generation(self) -> int:
        return self._generation

    def services_at(
        self, address: str, port: int, protocol: str, at_unix_s: float | None = None
    ) -> tuple[ServiceRef, ...]:
        if not self.available():
            return ()
        entries = self._answers.get((address, protocol.upper()))
        if not entries:
            return ()
        t = self._clock() if at_unix_s is None else at_unix_s
        found = {
            ref
            for entry_port, ref, released in entries
            if (entry_port is None or entry_port == port)
            and (released is None or t <= released + self._grace_s)
        }
        return tuple(sorted(found))

    def service_at(
        self, address: str, port: int, protocol: str, at_unix_s: float | None = None
    ) -> ServiceRef | None:
        found = self.services_at(address, port, protocol, at_unix_s)
        return found[0] if found else None

    def service_of_vip(self, address: str) -> ServiceRef | None:
        """The Service whose cluster IP `address` (canonical text) is, else None (or not available)."""
        if not self.available():
            return None
        return self._vips.get(address)

    def services(self) -> tuple[ServiceView, ...]:
        if not self.available():
            return ()
        generation, views = self._views
        if generation == self._generation:
            return views
        with self._lock:
            generation = self._generation
            views = tuple(self._view(ref) for ref in sorted(self._services))
        self._views = (generation, views)
        return views

    def service(self, ref: ServiceRef) -> ServiceView | None:
        return next((v for v in self.services() if v.ref == ref), None)

    def cluster_version(self) -> ClusterVersion | None:
        return self._version

    # --- sources ---------------------------------------------------------------------------------------

    def register_source(self, name: str) -> None:
        with self._lock:
            self._sources.setdefault(name, False)

    def mark_synced(self, name: str) -> None:
        with self._lock:
            self._sources[name] = True
            self._failures.pop(name, None)
            self._generation += 1

    def note_failure(self, name: str, description: str, *, refused: bool) -> None:
        """A source failed; `refused` (401/403, or a file without Services) turns the catalog off until
        it lists again. Other failures (a timeout) keep the last answers."""
        if not refused:
            return
        with self._lock:
            if self._failures.get(name) != description:
                self._failures[name] = description
                self._generation += 1

    def source_answered(self, name: str) -> None:
        """A request of source `name` was answered again (e.g. its watch, once RBAC allows it again): a
        refusal it noted is over, without waiting for its next full listing."""
        with self._lock:
            if self._failures.pop(name, None) is not None:
                self._generation += 1

    def node_zones_changed(self) -> None:
        """A node's zone label changed (or it appeared): endpoints without a zone of their own follow in
        the next views (cheap: called for every node while nodes are listed)."""
        self._generation += 1

    def set_version(self, version: ClusterVersion | None) -> None:
        self._version = version

    @property
    def service_count(self) -> int:
        return len(self._services)

    @property
    def slice_count(self) -> int:
        return len(self._slices)

    def upsert_service(self, record: ServiceRecord, now: float | None = None) -> None:
        with self._lock:
            old = self._services.get(record.ref)
            if old != record:
                self._services[record.ref] = record
                self._revip(old, record)
                self._touched({record.ref}, self._now(now))

    def delete_service(self, ref: ServiceRef, now: float | None = None) -> None:
        with self._lock:
            old = self._services.pop(ref, None)
            if old is not None:
                self._revip(old, None)
                self._signatures.pop(ref, None)
                self._changed.pop(ref, None)
                self._generation += 1

    def replace_services(self, records: Iterable[ServiceRecord], now: float | None = None) -> None:
        with self._lock:
            t = self._now(now)
            fresh = {r.ref: r for r in records}
            touched = {ref for ref, r in fresh.items() if self._services.get(ref) != r}
            gone = set(self._services) - set(fresh)
            for ref in touched | gone:
                self._revip(self._services.get(ref), fresh.get(ref))
            self._services = fresh
            for ref in gone:
                self._signatures.pop(ref, None)
                self._changed.pop(ref, None)
            self._touched(touched, t)
            self._generation += 1

    def upsert_slice(self, record: SliceRecord, now: float | None = None) -> None:
        with self._lock:
            self._put_slice(record, self._now(now))

    def delete_slice(self, record: SliceRecord, now: float | None = None) -> None:
        with self._lock:
            t = self._now(now)
            old = self._slices.pop(record.key, None)
            if old is not None:
                self._unlist(old, t)
                self._touched({old.service_ref} - {None}, t)  # type: ignore[arg-type]

    def replace_slices(self, records: Iterable[SliceRecord], now: float | None = None) -> None:
        with self._lock:
            t = self._now(now)
            fresh = {r.key: r for r in records}
            for key in [key for key in self._slices if key not in fresh]:
                old = self._slices.pop(key)
                self._unlist(old, t)
                self._touched({old.service_ref} - {None}, t)  # type: ignore[arg-type]
            for record in fresh.values():
                self._put_slice(record, t)
            self._generation += 1

    # --- internals (lock held) -------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _revip(self, old: ServiceRecord | None, new: ServiceRecord | None) -> None:
        """Readers see each cluster IP's answer change alone (one dict store each, no lock on their side)."""
        if old is not None:
            for address in old.cluster_ips:
                if self._vips.get(address) == old.ref:
                    del self._vips[address]
        if new is not None:
            for address in new.cluster_ips:
                self._vips[address] = new.ref

    def _put_slice(self, record: SliceRecord, now: float) -> None:
        old = self._slices.get(record.key)
        if old == record:
            return
        self._slices[record.key] = record
        if old is not None:
            self._unlist(old, now)
        self._list(record, now)
        self._touched({r for r in (record.service_ref, old.service_ref if old else None) if r}, now)

    def _entries(self, record: SliceRecord) -> set[tuple[_Key, int | None, ServiceRef]]:
        ref = record.service_ref
        if ref is None:
            return set()
        ports = [(p.protocol.upper(), p.port) for p in record.ports] or [("TCP", None)]
        return {((address, protocol), port, ref)
                for endpoint in record.endpoints for address in endpoint.addresses
                for protocol, port in ports}  # fmt: skip

    def _list(self, record: SliceRecord, now: float) -> None:
        if record.service_ref is not None:
            self._of.setdefault(record.service_ref, set()).add(record.key)
        keys: set[_Key] = set()
        for key, port, ref in self._entries(record):
            counts = self._listed.setdefault(key, Counter())
            if (port, ref) not in counts:
                if self._entry_count >= self._max_endpoints:
                    self._drop(key[0], ref)
                    continue
                self._entry_count += 1
            counts[(port, ref)] += 1
            keys.add(key)
        self._refresh(keys, now)

    def _unlist(self, record: SliceRecord, now: float) -> None:
        if record.service_ref is not None:
            of = self._of.get(record.service_ref, set())
            of.discard(record.key)
            if not of:
                self._of.pop(record.service_ref, None)
        keys: set[_Key] = set()
        for key, port, ref in self._entries(record):
            counts = self._listed.get(key)
            if counts is None or (port, ref) not in counts:
                continue  # refused by the cap when listed
            counts[(port, ref)] -= 1
            if counts[(port, ref)] <= 0:
                del counts[(port, ref)]
                self._entry_count -= 1
            if not counts:
                del self._listed[key]
            keys.add(key)
        self._refresh(keys, now)

    def _refresh(self, keys: set[_Key], now: float) -> None:
        """Swap in the answers of `keys`: what is listed now, plus what left within the grace period."""
        for key in keys:
            listed = set(self._listed.get(key, ()))
            kept: list[_Entry] = [(port, ref, None) for port, ref in sorted(listed, key=_order)]
            for port, ref, was_released in self._answers.get(key, ()):
                if (port, ref) in listed:
                    continue
                released = now if was_released is None else was_released
                if now <= released + self._grace_s:
                    kept.append((port, ref, released))
            if kept:
                self._answers[key] = tuple(kept)
            else:
                self._answers.pop(key, None)
        self._generation += 1

    def _touched(self, refs: set[ServiceRef], now: float) -> None:
        """Note the moment a Service's routing or its ready endpoints' zones changed."""
        for ref in refs:
            record = self._services.get(ref)
            if record is None:
                continue
            view = self._view(ref)
            zones = frozenset(z for z in view.endpoints_by_zone("ready") if z)
            signature = (view.routing, zones)
            before = self._signatures.get(ref)
            self._signatures[ref] = signature
            listed = bool(self._sources) and all(self._sources.values())  # the first sync is no change
            if before is not None and before != signature and listed:
                self._changed[ref] = now
                log.info("service routing changed service=%s/%s routing=%s->%s zones=%s->%s", ref.namespace,
                         ref.name, before[0], signature[0], ",".join(sorted(before[1])),
                         ",".join(sorted(zones)))
        self._generation += 1

    def _view(self, ref: ServiceRef) -> ServiceView:
        record = self._services[ref]
        endpoints = tuple(
            ServiceEndpoint(
                addresses=e.addresses,
                address_type=s.address_type,
                ports=s.ports,
                zone=e.zone or (self._node_zone(e.node_name) if e.node_name else None),
                node_name=e.node_name,
                pod_namespace=e.pod_namespace,
                pod_name=e.pod_name,
                ready=e.ready,
                serving=e.serving,
                terminating=e.terminating,
                hint_zones=e.hint_zones,
            )
            for s in (self._slices[key] for key in sorted(self._of.get(ref, ())))
            for e in s.endpoints
        )
        return ServiceView(
            ref=ref,
            type=record.type,
            cluster_ips=record.cluster_ips,
            headless=record.headless,
            ports=record.ports,
            traffic_distribution=record.traffic_distribution,
            topology_mode=record.topology_mode,
            external_traffic_policy=record.external_traffic_policy,
            internal_traffic_policy=record.internal_traffic_policy,
            endpoints=endpoints,
            changed_unix_s=self._changed.get(ref),
        )

    def _drop(self, address: str, ref: ServiceRef) -> None:
        self.endpoints_dropped += 1
        if self.endpoints_dropped == 1 or self.endpoints_dropped % 1000 == 0:
            log.warning("service endpoint cache full, endpoint not indexed address=%s service=%s/%s "
                        "dropped_total=%d max_endpoints=%d", address, ref.namespace, ref.name,
                        self.endpoints_dropped, self._max_endpoints)


def _order(item: tuple[int | None, ServiceRef]) -> tuple[int, ServiceRef]:
    return (-1 if item[0] is None else item[0], item[1])

