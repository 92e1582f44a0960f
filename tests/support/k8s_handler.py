"""The HTTP side of the test API server: routes, list pages, watch streams, Status errors.

State lives in `FakeApiServer` (k8s_apiserver.py); this module only speaks the protocol.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from tests.support.k8s_apiserver import Event, FakeApiServer, Stored

log = logging.getLogger(__name__)

_LIST_KIND = {"pods": b"PodList", "nodes": b"NodeList"}
_OBJ_KIND = {"pods": "Pod", "nodes": "Node"}
_FIELDS: dict[str, Callable[[Stored], str]] = {
    "spec.nodeName": lambda s: s.node_name,
    "metadata.name": lambda s: s.name,
    "metadata.namespace": lambda s: s.namespace,
}


def encode_continue(token: str, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"t": token, "o": offset}).encode()).decode()


def decode_continue(value: str) -> tuple[str, int]:
    data = json.loads(base64.urlsafe_b64decode(value.encode()))
    return str(data["t"]), int(data["o"])


def field_predicate(selector: str, namespace: str | None) -> Callable[[Stored], bool]:
    """`spec.nodeName=n1,metadata.name!=x` (+ the namespace of a namespaced path) -> predicate."""
    terms: list[tuple[Callable[[Stored], str], str, bool]] = []
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            field, value, equal = *term.split("!=", 1), False
        elif "==" in term:
            field, value, equal = *term.split("==", 1), True
        elif "=" in term:
            field, value, equal = *term.split("=", 1), True
        else:
            raise ValueError(f"invalid field selector term {term!r}")
        getter = _FIELDS.get(field.strip())
        if getter is None:
            raise ValueError(f'field label not supported: {field.strip()}')
        terms.append((getter, value.strip(), equal))
    if namespace is not None:
        terms.append((_FIELDS["metadata.namespace"], namespace, True))
    return lambda stored: all((get(stored) == value) is equal for get, value, equal in terms)


def _route(path: str) -> tuple[str, str | None] | None:
    parts = [p for p in path.split("/") if p]
    if parts[:2] != ["api", "v1"]:
        return None
    rest = parts[2:]
    if rest in (["pods"], ["nodes"]):
        return rest[0], None
    if len(rest) == 3 and rest[0] == "namespaces" and rest[2] == "pods":
        return "pods", rest[1]
    return None


def status_body(code: int, reason: str, message: str) -> bytes:
    return json.dumps({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }).encode()


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive + chunked watch streams, as the real server

    @property
    def api(self) -> FakeApiServer:
        return self.server.api  # type: ignore[attr-defined, no-any-return]

    def setup(self) -> None:
        super().setup()
        self.api.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError as exc:  # the peer (or drop_connections) already closed it
            log.debug("finish failed error=%r", exc)
        finally:
            self.api.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake-apiserver " + format, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.api.requests_raw.append(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = _route(url.path)
        if route is None:
            self._send(404, status_body(404, "NotFound", f"the server could not find {url.path}"))
            return
        resource, namespace = route
        try:
            predicate = field_predicate(query.get("fieldSelector", ""), namespace)
        except ValueError as exc:
            self._send(400, status_body(400, "BadRequest", str(exc)))
            return
        if query.get("watch") in ("1", "true", "True"):
            self.api.requests.append(f"watch {resource}")
            if self.api.refuse_watches:
                self._send(503, status_body(503, "ServiceUnavailable", "apiserver is shutting down"))
                return
            self._watch(resource, predicate, query)
        else:
            self.api.requests.append(f"list {resource}")
            self._list(resource, predicate, query)

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _list(self, resource: str, predicate: Callable[[Stored], bool], query: dict[str, str]) -> None:
        limit = int(query.get("limit") or 0)
        if query.get("continue"):
            token, offset = decode_continue(query["continue"])
            snap = self.api.find_snapshot(token)
            if snap is None:
                self._send(410, status_body(410, "Expired", "The provided continue parameter is too old to "
                           "display a consistent list result. You can start a new list without the continue "
                           "parameter."))
                return
        else:
            snap, offset, token = self.api.snapshot(resource, predicate), 0, ""
        end = offset + limit if limit else len(snap.items)
        page = snap.items[offset:end]
        meta: dict[str, Any] = {"resourceVersion": str(snap.rv)}
        if end < len(snap.items):
            token = token or self.api.keep_snapshot(snap)
            meta["continue"] = encode_continue(token, end)
            meta["remainingItemCount"] = len(snap.items) - end
        body = b"".join((
            b'{"kind":"', _LIST_KIND[resource], b'","apiVersion":"v1","metadata":',
            json.dumps(meta).encode(), b',"items":[', b",".join(page), b"]}",
        ))
        self._send(200, body)

    def _watch(self, resource: str, predicate: Callable[[Stored], bool], query: dict[str, str]) -> None:
        api = self.api
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true", "True")
        timeout_s = float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True  # a watch stream is not reused for another request
        try:
            version = query.get("resourceVersion", "")
            if version in ("", "0"):  # no version: the current state first, as ADDED events
                cursor, current = api.current(resource)
                self._chunk(b"".join(_event("ADDED", s.data) for s in current if predicate(s)))
            else:
                cursor = int(version)
            self._stream(resource, predicate, cursor, bookmarks, time.monotonic() + timeout_s)
        except OSError as exc:  # the client went away, or drop_connections() cut the socket
            log.debug("watch stream ended error=%r", exc)

    def _stream(
        self, resource: str, predicate: Callable[[Stored], bool], cursor: int, bookmarks: bool, end: float
    ) -> None:
        """Send events after `cursor` until the deadline, a drop, a stop, or 410."""
        epoch = self.api.drop_epoch
        last_write = time.monotonic()
        while True:
            idle_until = last_write + self.api.bookmark_interval_s if bookmarks else end
            events = self._wait_events(cursor, epoch, min(idle_until, end))
            if events is None:
                return
            if events:
                cursor = events[-1].rv
                data = b"".join(
                    _event(e.type, e.obj.data) for e in events if e.resource == resource and predicate(e.obj)
                )
                if data:
                    self._chunk(data)
                    last_write = time.monotonic()
            now = time.monotonic()
            if now >= end:
                self._end()
                return
            if bookmarks and now - last_write >= self.api.bookmark_interval_s:
                mark = {"kind": _OBJ_KIND[resource], "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(cursor)}}
                self._chunk(_event("BOOKMARK", json.dumps(mark).encode()))
                last_write = now

    def _wait_events(self, cursor: int, epoch: int, until: float) -> list[Event] | None:
        """Events after `cursor` (empty when `until` passed first); None when the stream must stop."""
        api = self.api
        with api.cond:
            while True:
                if api.stopping or api.drop_epoch != epoch:
                    return None
                if cursor < api.compacted_rv:
                    message = f"too old resource version: {cursor} ({api.compacted_rv})"
                    self._chunk(_event("ERROR", status_body(410, "Expired", message)))
                    self._end()
                    return None
                events = api.events_after(cursor)
                remaining = until - time.monotonic()
                if events or remaining <= 0:
                    return events
                api.cond.wait(remaining)

    def _chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the stream: that is _end()'s job
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


def _event(kind: str, data: bytes) -> bytes:
    return b'{"type":"%s","object":%s}\n' % (kind.encode(), data)
