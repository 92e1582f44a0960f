"""Metadata from the API server: list + watch of pods and nodes (and, for the enricher, Services and
EndpointSlices into `index.services`) through the real `kubernetes` client.

Responses are read raw (the client never deserializes them) and decoded with `json.loads` into the few
fields we keep: the client's generated models cost seconds and gigabytes at 150,000 pods. The requests go
through the client's `ApiClient` (configuration, authentication, TLS, errors as `ApiException`) but not its
generated API classes: importing `CoreV1Api` (pydantic-validated signatures of ~1,000 calls, ~250 models)
costs ~21 MB of RSS in every agent, for four GET paths (`_Lister`). One `ApiSource` per resource:

1. list in pages (`limit`/`continue`), then replace the index's view of that resource and mark it synced;
2. watch from the list's `resourceVersion` with bookmarks (so the version we resume from stays fresh);
3. a watch that ends normally is resumed from the last version seen; `410 Gone` (an ERROR event, or an
   expired `continue`) means our version is older than the server's history: list again;
4. any other error: reconnect after an exponential backoff with jitter (at most 30 s, so a source that
   keeps failing logs a WARNING naming the resource and the HTTP status at least once a minute); the index
   keeps the failure streak (`sync_state()`: a 401/403 on pods or nodes makes metadata unsynced, the
   component unready) until a request of that source is answered again.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from otel_kzt.k8s.decode import decode_node, decode_pod, gc_paused
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.servicedecode import decode_service, decode_slice
from otel_kzt.k8s.servicemodel import ClusterVersion
from otel_kzt.k8s.services import ServiceIndex

log = logging.getLogger(__name__)

_GONE = 410


@dataclass(frozen=True, slots=True)
class WatchConfig:
    page_size: int = 500
    watch_timeout_s: int = 300  # the server ends each watch after this; we resume from the last version
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0  # no byte (not even a bookmark) for this long: reconnect, quietly
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 30.0


class _Gone(Exception):
    """Our resourceVersion is older than the server keeps: a full re-list is needed."""


@dataclass(frozen=True, slots=True)
class _Resource:
    """How to list, decode and apply one resource kind."""

    kind: str
    list_call: Callable[..., urllib3.BaseHTTPResponse]  # a _Lister
    decode: Callable[[Mapping[str, Any]], Any]
    upsert: Callable[[Any], None]  # takes a decoded record
    delete: Callable[[Any], None]  # takes a decoded record
    replace: Callable[[list[Any]], None]  # takes every decoded record of a full listing


# Query parameters of a list/watch call, as the generated API classes name them -> as the server does.
_QUERY = {
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "_continue": "continue",
    "field_selector": "fieldSelector",
    "limit": "limit",
    "resource_version": "resourceVersion",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
}


@dataclass(frozen=True, slots=True)
class _Lister:
    """`GET <path>` (list, or watch with `watch=True`) through the client's ApiClient, answered raw: what
    `CoreV1Api.list_node(..., _preload_content=False)` does, without importing the generated classes."""

    api_client: k8s_client.ApiClient
    path: str  # /api/v1/pods, /apis/discovery.k8s.io/v1/endpointslices ...

    def __call__(self, *, _request_timeout: Any, **params: Any) -> urllib3.BaseHTTPResponse:
        query = [(_QUERY[name], value) for name, value in params.items() if value is not None]
        request = self.api_client.param_serialize(
            method="GET",
            resource_path=self.path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=_request_timeout)
        if not 200 <= response.status <= 299:
            response.read()  # type: ignore[no-untyped-call]
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        raw: urllib3.BaseHTTPResponse = response.response
        return raw


def pod_resource(api_client: k8s_client.ApiClient, index: ClusterIndex) -> _Resource:
    return _Resource(
        kind="pods",
        list_call=_Lister(api_client, "/api/v1/pods"),
        decode=decode_pod,
        upsert=index.upsert_pod,
        delete=lambda record: index.delete_pod(record.uid),
        replace=index.replace_pods,
    )


def node_resource(api_client: k8s_client.ApiClient, index: ClusterIndex) -> _Resource:
    return _Resource(
        kind="nodes",
        list_call=_Lister(api_client, "/api/v1/nodes"),
        decode=decode_node,
        upsert=index.upsert_node,
        delete=lambda info: index.delete_node(info.name),
        replace=index.replace_nodes,
    )


def service_resource(api_client: k8s_client.ApiClient, catalog: ServiceIndex,
                     version: Callable[[], ClusterVersion | None]) -> _Resource:
    def replace(records: list[Any]) -> None:
        catalog.set_version(version() or catalog.cluster_version())  # re-read at each full listing
        catalog.replace_services(records)

    return _Resource(
        kind="services",
        list_call=_Lister(api_client, "/api/v1/services"),
        decode=decode_service,
        upsert=catalog.upsert_service,
        delete=lambda record: catalog.delete_service(record.ref),
        replace=replace,
    )


def slice_resource(api_client: k8s_client.ApiClient, catalog: ServiceIndex) -> _Resource:
    return _Resource(
        kind="endpointslices",
        list_call=_Lister(api_client, "/apis/discovery.k8s.io/v1/endpointslices"),
        decode=decode_slice,
        upsert=catalog.upsert_slice,
        delete=catalog.delete_slice,
        replace=catalog.replace_slices,
    )


def cluster_version(api_client: k8s_client.ApiClient) -> ClusterVersion | None:
    """The API server's `/version` (minor "30+" on managed clusters is 30); None when it does not say."""
    try:
        info = k8s_client.VersionApi(api_client).get_code(_request_timeout=10)
        minor = "".join(ch for ch in str(info.minor) if ch.isdigit())
        return ClusterVersion(int(info.major), int(minor), str(info.git_version))
    except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError, TypeError) as exc:
        log.warning("cannot read the cluster version (the savings recommend PreferSameZone) error=%s",
                    _describe(exc))
        return None


class ApiSource:
    """List + watch one resource into the index (or `gate`: the Service catalog), in a daemon thread."""

    def __init__(
        self,
        resource: _Resource,
        index: ClusterIndex | ServiceIndex,
        field_selector: str | None = None,
        config: WatchConfig | None = None,
    ) -> None:
        self.name = f"api-{resource.kind}"
        self._resource = resource
        self._index = index
        self._selector = field_selector
        self._config = config or WatchConfig()
        self._rv: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response_lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        # Counters for tests, health and the benchmark.
        self.lists = 0
        self.events = 0  # ADDED / MODIFIED / DELETED applied
        self.bookmarks = 0
        self.reconnects = 0
        self.gone = 0
        self.bad_objects = 0
        self._verb = "list"
        self._failing = False
        if isinstance(index, ClusterIndex):
            index.register_source(self.name, (resource.kind,))
        else:
            index.register_source(self.name)  # the Service catalog: its own switch, never readiness

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"kzt-metadata-{self.name}", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._abort_response()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self._config.connect_timeout_s + 5)

    # --- the loop ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._config.initial_backoff_s
        while not self._stop.is_set():
            try:
                if self._rv is None:
                    self._list()
                if self._watch():
                    backoff = self._config.initial_backoff_s  # made progress: next failure starts small
                elif not self._stop.is_set():
                    # A watch that ends at once without a single event (a misbehaving proxy): no hot loop.
                    log.debug("empty watch resource=%s", self._resource.kind)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self._config.max_backoff_s)
            except _Gone:
                self.gone += 1
                self._rv = None
                log.info("resource version expired, re-listing resource=%s", self._resource.kind)
            except urllib3.exceptions.ReadTimeoutError:
                # Nothing, not even a bookmark, for read_timeout_s: a quiet watch (a node-scoped one can
                # idle for minutes) or a half-open connection. Either way: reconnect now, no alarm.
                log.debug("watch idle past the read timeout, reconnecting resource=%s", self._resource.kind)
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                self._note_failure(exc)
                backoff = self._back_off(backoff, exc)
            except Exception as exc:  # a bug must not silently end the only thread feeding this resource
                log.exception("metadata source failed unexpectedly resource=%s", self._resource.kind)
                backoff = self._back_off(backoff, exc)

    def _note_failure(self, exc: BaseException) -> None:
        """Tell a catalog that says why it is off (the Service catalog) what failed."""
        note = getattr(self._index, "note_failure", None)
        if note is not None:
            denied = isinstance(exc, ApiException) and exc.status in (401, 403)
            note(self.name, f"list/watch {self._resource.kind}: {_status_text(exc)}", refused=denied)

    def _back_off(self, backoff: float, exc: BaseException) -> float:
        """Record the failure, sleep a jittered `backoff` (5,000 agents must not reconnect in step); the
        next one, doubled."""
        self.reconnects += 1
        self._failing = True
        status, reason, message = failure_of(exc)
        attempts = 0
        if isinstance(self._index, ClusterIndex):
            attempts = self._index.source_failed(self.name, self._verb, status, reason, message).attempts
        delay = backoff * (0.5 + random.random())
        log.warning(
            "metadata %s failed, retrying resource=%s status=%s reason=%s delay_s=%.2f attempts=%d error=%s",
            self._verb, self._resource.kind, status if status is not None else "none", reason, delay,
            attempts, message,
        )  # fmt: skip
        self._stop.wait(delay)
        return min(backoff * 2, self._config.max_backoff_s)

    def _list(self) -> None:
        # Decoded page by page: 100,000 raw pod dicts at once would cost gigabytes.
        records: list[Any] = []
        token: str | None = None
        rv = None
        while True:
            response = self._call(limit=self._config.page_size, _continue=token)
            try:
                data = response.data
            finally:
                self._forget(response)
            with gc_paused():
                page = json.loads(data)
                for obj in page.get("items") or ():
                    record = self._decode(obj)
                    if record is not None:
                        records.append(record)
                page.pop("items", None)  # freed while the collector is still paused: no promotion
            meta = page.get("metadata") or {}
            rv = rv or meta.get("resourceVersion")
            token = meta.get("continue") or None
            if token is None:
                break
            if self._stop.is_set():
                return  # a partial listing must never replace the index's view
        self._resource.replace(records)
        self._rv = rv
        self.lists += 1
        self._index.mark_synced(self.name)
        log.info("listed resource=%s count=%d resource_version=%s", self._resource.kind, len(records), rv)

    def _decode(self, obj: Mapping[str, Any]) -> Any:
        """The decoded record, or None for a malformed object (counted and logged, never fatal)."""
        try:
            return self._resource.decode(obj)
        except (KeyError, TypeError, AttributeError) as exc:
            self.bad_objects += 1
            log.warning("skipping malformed object resource=%s error=%r", self._resource.kind, exc)
            return None

    def _call(self, **params: Any) -> urllib3.BaseHTTPResponse:
        """One raw list/watch request; 410 (an expired continue or version) raises _Gone.

        The response is remembered until `_forget`, so `shutdown()` can cut a blocked read.
        """
        self._verb = "watch" if params.get("watch") else "list"
        try:
            response: urllib3.BaseHTTPResponse = self._resource.list_call(
                field_selector=self._selector,
                _request_timeout=(self._config.connect_timeout_s, self._config.read_timeout_s),
                **params,
            )
        except ApiException as exc:
            if exc.status == _GONE:
                raise _Gone() from exc
            raise
        if self._failing:
            self._failing = False
            self._index.source_answered(self.name)
            log.info("metadata %s answered again resource=%s", self._verb, self._resource.kind)
        with self._response_lock:
            self._response = response
        if self._stop.is_set():
            self._abort_response()
        return response

    def _forget(self, response: urllib3.BaseHTTPResponse) -> None:
        with self._response_lock:
            self._response = None
        response.release_conn()

    def _watch(self) -> bool:
        """Stream events until the server ends the watch. True when at least one event arrived."""
        response = self._call(
            watch=True,
            resource_version=self._rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self._config.watch_timeout_s,
        )
        progressed = False
        try:
            for line in _lines(response):
                self._apply(json.loads(line))
                progressed = True
        finally:
            self._forget(response)
        return progressed

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == _GONE:
                raise _Gone()
            error = ApiException(status=obj.get("code"), reason=obj.get("reason") or "watch error event")
            error.body = json.dumps(obj)
            raise error
        meta = obj.get("metadata") or {}
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            record = self._decode(obj)
            if record is not None and kind == "DELETED":
                self._resource.delete(record)
            elif record is not None:
                self._resource.upsert(record)
            self.events += 1
        elif kind == "BOOKMARK":
            self.bookmarks += 1
        if meta.get("resourceVersion"):
            self._rv = meta["resourceVersion"]  # BOOKMARK events carry only this

    def _abort_response(self) -> None:
        """Unblock a thread reading a watch stream (shutdown)."""
        with self._response_lock:
            response = self._response
        if response is not None:
            try:
                response.shutdown()
            except (OSError, AttributeError) as exc:
                log.debug("closing watch stream failed error=%r", exc)


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """Newline-delimited JSON events from a chunked watch response."""
    pending = b""
    for chunk in response.stream(65536):
        pending += chunk
        if b"\n" not in pending:
            continue
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def failure_of(exc: BaseException) -> tuple[int | None, str, str]:
    """(HTTP status or None, reason, message): from the server's `Status` when it sent one."""
    if isinstance(exc, ApiException):
        reason, message = str(exc.reason or ""), ""
        try:
            body = json.loads(exc.body) if exc.body else {}
        except (ValueError, TypeError):
            body = {}
        if isinstance(body, dict):
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
        return exc.status, reason, message or f"HTTP {exc.status} {exc.reason}"
    return None, type(exc).__name__, str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _status_text(exc: BaseException) -> str:
    """`HTTP 403 Forbidden: services is forbidden: User ...` (the Status message when there is one)."""
    text = _describe(exc)
    if isinstance(exc, ApiException) and exc.body:
        try:
            message = json.loads(exc.body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            text += f": {message}"
    return text


def api_sources(
    api_client: k8s_client.ApiClient,
    index: ClusterIndex,
    *,
    node_name: str | None = None,
    config: WatchConfig | None = None,
    service_vips: bool = False,
) -> list[ApiSource]:
    """The pod and node sources; node-scoped (agent) when `node_name` is given. Cluster-wide (the
    enricher) also Services and EndpointSlices, which never hold the index's readiness back. An agent
    with `service_vips` (cgroup mode: it counts bytes to Service VIPs) also lists Services, cluster-wide
    (their cluster IPs: it needs no endpoints, and no version)."""
    pod_selector = f"spec.nodeName={node_name}" if node_name else None
    node_selector = f"metadata.name={node_name}" if node_name else None
    sources = [
        ApiSource(node_resource(api_client, index), index, node_selector, config),
        ApiSource(pod_resource(api_client, index), index, pod_selector, config),
    ]
    catalog = index.services
    if node_name is None:
        sources += [
            ApiSource(service_resource(api_client, catalog, lambda: cluster_version(api_client)), catalog,
                      None, config),
            ApiSource(slice_resource(api_client, catalog), catalog, None, config),
        ]
    elif service_vips:
        sources.append(ApiSource(service_resource(api_client, catalog, lambda: None), catalog, None, config))
    return sources
