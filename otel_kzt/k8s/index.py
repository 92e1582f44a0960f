"""The concrete `MetadataIndex`: IP -> endpoint with reuse history, node name -> NodeInfo.

Sources (file, API watches) write through `upsert_*`, `delete_*` and `replace_*` under one lock; readers
never lock. Each IP maps to one immutable value that writers swap in whole, so a reader sees either the old
or the new binding, never half of one:

- an `Endpoint`: the IP is bound now and was never seen bound to anyone else (the common case, and the
  cheapest for memory and lookups);
- a tuple of spans `(start, end, endpoint)`, newest first, `end` None for the current binding: the IP was
  released (pod deleted or finished) and possibly reused. A released span answers lookups for `grace_s`
  after its end, so a flow measured before the reuse, or reported late, still names the pod that sent it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from otel_kzt.k8s.decode import PodRecord, node_endpoint
from otel_kzt.k8s.model import Endpoint, NodeInfo, SourceFailure, SyncState
from otel_kzt.k8s.services import ServiceIndex
from otel_kzt.k8s.syncstate import CORE_RESOURCES, SourceStates

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 300.0
# Caps far above Kubernetes' own limits (150,000 pods, 5,000 nodes): they only stop a runaway source from
# eating the host. Objects beyond them are not indexed (their IPs answer "unknown"), counted and logged.
DEFAULT_MAX_PODS = 1_000_000
DEFAULT_MAX_NODES = 100_000
# Spans kept per IP: an IP recycled more often than this within the grace period loses its oldest names.
MAX_SPANS_PER_IP = 8

_FOREVER = float("-inf")
_Span = tuple[float, float | None, Endpoint]
_Binding = Endpoint | tuple[_Span, ...]


def _owner(endpoint: Endpoint) -> str | None:
    """Who holds a binding: the pod's uid, or the node's name for node addresses."""
    return endpoint.pod_uid if endpoint.pod_uid is not None else endpoint.node_name


class ClusterIndex:
    """Implements `otel_kzt.k8s.model.MetadataIndex`; fed by one or more sources.

    Addresses are matched as canonical text, as `ipaddress` and the agent print them (`fd00::5`, never
    `fd00:0::5`); sources canonicalize what they store.
    """

    def __init__(
        self,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.time,
        max_pods: int = DEFAULT_MAX_PODS,
        max_nodes: int = DEFAULT_MAX_NODES,
    ) -> None:
        self._grace_s = grace_s
        self._max_pods = max_pods
        self._max_nodes = max_nodes
        self._clock = clock
        self._lock = threading.Lock()
        self._by_ip: dict[str, _Binding] = {}
        self._pods: dict[str, PodRecord] = {}
        self._nodes: dict[str, NodeInfo] = {}
        self._node_endpoints: dict[str, Endpoint] = {}
        self._expiry: deque[tuple[float, str]] = deque()  # (when a released span may be dropped, ip)
        self._states = SourceStates(clock)
        self._ready = False
        self._generation = 0
        self.spans_evicted = 0  # history cut short by MAX_SPANS_PER_IP (counted, and logged)
        self.objects_dropped = 0  # pods/nodes refused by the caps (counted, and logged)
        # Services and EndpointSlices (the ServiceCatalog of seam 5): an endpoint without a zone of its
        # own takes its node's.
        self.services = ServiceIndex(node_zone=self._node_zone, grace_s=grace_s, clock=clock)

    # --- MetadataIndex ---------------------------------------------------------------------------------

    def ready(self) -> bool:
        return self._ready

    @property
    def generation(self) -> int:
        return self._generation

    def lookup(self, address: str, at_unix_s: float | None = None) -> Endpoint | None:
        if not self._ready:
            return None
        value = self._by_ip.get(address)
        if value is None or value.__class__ is Endpoint:
            return value
        t = self._clock() if at_unix_s is None else at_unix_s
        for start, end, endpoint in value:  # type: ignore[union-attr]
            if t >= start:
                if end is None or t <= end + self._grace_s:
                    return endpoint
                return None
        return None  # before every span we still remember: unknown, not a guess

    def lookup_window(
        self, address: str, at_unix_s: float | None = None
    ) -> tuple[Endpoint | None, float, float]:
        """`lookup`, and the times [from, until) around `at_unix_s` over which its answer holds while the
        generation is unchanged: a caller (the enricher) caches one answer for every time inside."""
        value = self._by_ip.get(address) if self._ready else None
        if value is None or value.__class__ is Endpoint:
            return value, _FOREVER, math.inf
        t = self._clock() if at_unix_s is None else at_unix_s
        newer = math.inf  # start of the next newer span: where the answer changes at the latest
        for start, end, endpoint in value:  # type: ignore[union-attr]
            if t >= start:
                if end is None:
                    return endpoint, start, newer
                expiry = math.nextafter(end + self._grace_s, math.inf)  # lookup keeps t == end + grace
                return (endpoint, start, min(expiry, newer)) if t < expiry else (None, expiry, newer)
            newer = start
        return None, _FOREVER, newer

    def node(self, name: str) -> NodeInfo | None:
        if not self._ready:
            return None
        return self._nodes.get(name)

    def _node_zone(self, name: str) -> str | None:
        info = self._nodes.get(name)
        return info.zone if info is not None else None

    # --- introspection ---------------------------------------------------------------------------------

    @property
    def pod_count(self) -> int:
        return len(self._pods)

    @property
    def node_count(self) -> int:
        return len(self._nodes)

    def nodes(self) -> list[NodeInfo]:
        return list(self._nodes.values())

    def sources(self) -> dict[str, bool]:
        """Each registered source and whether it finished its first full sync."""
        return self._states.names()

    def sync_state(self) -> SyncState:
        """Synced (every required source listed once and none refused with 401/403 now), whether the
        Services answer, and every failure now, named by resource, verb and HTTP status."""
        return self._states.state(self.services.available())

    # --- sources ---------------------------------------------------------------------------------------

    def register_source(
        self, name: str, resources: tuple[str, ...] = CORE_RESOURCES, required: bool = True
    ) -> None:
        """A source of `resources`; a required one must finish a first full sync before the index answers
        and must not be refused for the component to be ready."""
        with self._lock:
            self._states.register(name, resources, required)
            self._ready = self._states.listed()

    def mark_synced(self, name: str) -> None:
        with self._lock:
            ready, was = self._states.synced(name), self._ready
            self._ready = ready
            if ready and not was:  # answering from now on: a new generation, once lookups answer
                log.info("metadata index ready pods=%d nodes=%d", len(self._pods), len(self._nodes))
                self._bump()

    def source_failed(
        self, name: str, verb: str, status: int | None, reason: str, message: str
    ) -> SourceFailure:
        """One failed request of source `name` (what it listed before keeps answering)."""
        return self._states.failed(name, verb, status, reason, message)

    def source_answered(self, name: str) -> None:
        """A request of source `name` was answered: its failure streak is over."""
        self._states.recovered(name)

    def upsert_pod(self, record: PodRecord, now: float | None = None) -> None:
        with self._lock:
            self._upsert_pod(record, self._now(now))

    def delete_pod(self, uid: str, now: float | None = None) -> None:
        with self._lock:
            self._delete_pod(uid, self._now(now))

    def replace_pods(self, records: Iterable[PodRecord], now: float | None = None) -> None:
        """A full listing: pods missing from it are gone (their IPs released), the others upserted."""
        with self._lock:
            t = self._now(now)
            seen: set[str] = set()
            for record in records:
                seen.add(record.uid)
                self._upsert_pod(record, t)
            for uid in [uid for uid in self._pods if uid not in seen]:
                self._delete_pod(uid, t)

    def upsert_node(self, info: NodeInfo, now: float | None = None) -> None:
        with self._lock:
            self._upsert_node(info, self._now(now))

    def delete_node(self, name: str, now: float | None = None) -> None:
        with self._lock:
            self._delete_node(name, self._now(now))

    def replace_nodes(self, infos: Iterable[NodeInfo], now: float | None = None) -> None:
        with self._lock:
            t = self._now(now)
            seen: set[str] = set()
            for info in infos:
                seen.add(info.name)
                self._upsert_node(info, t)
            for name in [name for name in self._nodes if name not in seen]:
                self._delete_node(name, t)

    def expire(self, now: float | None = None) -> None:
        """Drop released bindings older than the grace period (writers also do this as they go)."""
        with self._lock:
            self._now(now)

    # --- internals (lock held) -------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        t = self._clock() if now is None else now
        while self._expiry and self._expiry[0][0] <= t:
            _, ip = self._expiry.popleft()
            self._prune(ip, t)
        return t

    def _upsert_pod(self, record: PodRecord, now: float) -> None:
        old = self._pods.get(record.uid)
        if old is None and len(self._pods) >= self._max_pods:
            self._drop("pod", record.uid)
            return
        self._pods[record.uid] = record
        if old is not None and old.ips == record.ips and old.endpoint == record.endpoint:
            return  # a status update that changes nothing we answer: no generation bump
        if old is not None:
            for ip in old.ips:
                if ip not in record.ips:
                    self._release(ip, record.uid, now)
        for ip in record.ips:
            self._bind(ip, record.endpoint, now)
        self._bump()

    def _delete_pod(self, uid: str, now: float) -> None:
        old = self._pods.pop(uid, None)
        if old is None:
            return
        for ip in old.ips:
            self._release(ip, uid, now)
        self._bump()

    def _upsert_node(self, info: NodeInfo, now: float) -> None:
        old = self._nodes.get(info.name)
        if old is None and len(self._nodes) >= self._max_nodes:
            self._drop("node", info.name)
            return
        self._nodes[info.name] = info
        if old == info:
            return
        endpoint = self._node_endpoints.get(info.name)
        if endpoint is None:
            endpoint = self._node_endpoints[info.name] = node_endpoint(info.name)
        for ip in old.addresses if old is not None else ():
            if ip not in info.addresses:
                self._release(ip, info.name, now)
        for ip in info.addresses:
            self._bind(ip, endpoint, now)
        if old is None or old.zone != info.zone:
            self.services.node_zones_changed()
        self._bump()

    def _delete_node(self, name: str, now: float) -> None:
        old = self._nodes.pop(name, None)
        self._node_endpoints.pop(name, None)
        if old is None:
            return
        for ip in old.addresses:
            self._release(ip, name, now)
        self._bump()

    def _bump(self) -> None:
        """A new generation, once the change is in place: the enricher's workers read the index without
        its lock and cache each answer under the generation they read first (processing/resolution.py),
        so a generation moved before its bindings were swapped in had a stale answer cached under it."""
        self._generation += 1

    def _bind(self, ip: str, endpoint: Endpoint, now: float) -> None:
        value = self._by_ip.get(ip)
        if value is None:
            self._by_ip[ip] = endpoint
            return
        if isinstance(value, Endpoint):
            if _owner(value) == _owner(endpoint):
                self._by_ip[ip] = endpoint  # same holder, new details (e.g. node name filled in)
                return
            # Another holder still bound: its release has not reached us yet. It ends now.
            self._by_ip[ip] = ((now, None, endpoint), (_FOREVER, now, value))
            self._expiry.append((now + self._grace_s, ip))
            return
        spans = list(value)
        start, end, current = spans[0]
        if end is None and _owner(current) == _owner(endpoint):
            spans[0] = (start, None, endpoint)
        else:
            if end is None:
                spans[0] = (start, now, current)
                self._expiry.append((now + self._grace_s, ip))
            spans.insert(0, (now, None, endpoint))
        self._by_ip[ip] = self._capped(spans)

    def _release(self, ip: str, owner: str, now: float) -> None:
        value = self._by_ip.get(ip)
        if value is None:
            return
        if isinstance(value, Endpoint):
            if _owner(value) == owner:
                self._by_ip[ip] = ((_FOREVER, now, value),)
                self._expiry.append((now + self._grace_s, ip))
            return
        start, end, current = value[0]
        if end is None and _owner(current) == owner:
            self._by_ip[ip] = ((start, now, current), *value[1:])
            self._expiry.append((now + self._grace_s, ip))

    def _prune(self, ip: str, now: float) -> None:
        value = self._by_ip.get(ip)
        if value is None or isinstance(value, Endpoint):
            return
        kept = tuple(span for span in value if span[1] is None or span[1] + self._grace_s > now)
        if not kept:
            del self._by_ip[ip]
        else:
            # Even a lone current span keeps its start: before it, the IP belonged to a pod we forgot, and
            # "unknown" beats naming the wrong pod.
            self._by_ip[ip] = kept

    def _drop(self, kind: str, key: str) -> None:
        self.objects_dropped += 1
        if self.objects_dropped == 1 or self.objects_dropped % 1000 == 0:  # logged, without a log storm
            log.warning("metadata cache full, %s not indexed key=%s dropped_total=%d max_pods=%d "
                        "max_nodes=%d", kind, key, self.objects_dropped, self._max_pods, self._max_nodes)

    def _capped(self, spans: list[_Span]) -> tuple[_Span, ...]:
        if len(spans) > MAX_SPANS_PER_IP:
            dropped = len(spans) - MAX_SPANS_PER_IP
            self.spans_evicted += dropped
            if self.spans_evicted == dropped or self.spans_evicted % 1000 < dropped:
                log.warning("IP reuse history full, oldest names dropped dropped=%d total=%d", dropped,
                            self.spans_evicted)
            del spans[MAX_SPANS_PER_IP:]
        return tuple(spans)
