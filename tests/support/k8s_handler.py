"""The HTTP side of the test API server: authentication, RBAC, routes, list pages, watch streams, Status.

State lives in `FakeApiServer` (k8s_apiserver.py); this module only speaks the protocol. Every request
is authenticated (bearer token -> user, 401 otherwise) and authorised against the server's RBAC (403 with
the real Status otherwise) before it is routed, in that order, as kube-apiserver does.
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

from tests.support.k8s_discovery import document, version_info
from tests.support.k8s_rbac import UNAUTHORIZED, Request, User, forbidden, status
from tests.support.k8s_resources import RESOURCES, ResourceType, request_info

if TYPE_CHECKING:
    from tests.support.k8s_apiserver import Event, FakeApiServer, Stored

log = logging.getLogger(__name__)

Predicate = Callable[["Stored"], bool]
_HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz"})


def encode_continue(token: str, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"t": token, "o": offset}).encode()).decode()


def decode_continue(value: str) -> tuple[str, int]:
    data = json.loads(base64.urlsafe_b64decode(value.encode()))
    return str(data["t"]), int(data["o"])


def field_predicate(resource: ResourceType, selector: str, namespace: str | None) -> Predicate:
    """`spec.nodeName=n1,metadata.name!=x` (+ the namespace of a namespaced path) -> predicate.

    Only the fields the real server supports for that resource; any other is 400, as there.
    """
    terms: list[tuple[str, str, bool]] = []
    supported = resource.selectable()
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            name, value, equal = *term.split("!=", 1), False
        elif "==" in term:
            name, value, equal = *term.split("==", 1), True
        elif "=" in term:
            name, value, equal = *term.split("=", 1), True
        else:
            raise ValueError(f"invalid field selector term {term!r}")
        if name.strip() not in supported:
            raise ValueError(f"field label not supported: {name.strip()}")
        terms.append((name.strip(), value.strip(), equal))
    if namespace is not None:
        terms.append(("metadata.namespace", namespace, True))
    return lambda stored: all((stored.field(name) == value) is equal for name, value, equal in terms)


_REVIEW = ("authorization.k8s.io", "v1", "selfsubjectaccessreviews")


def _served(info: Request, method: str) -> ResourceType | None:
    """The resource a GET names, when this server serves it at that group, version and scope."""
    resource = RESOURCES.get(info.resource)
    if resource is None or method != "GET" or info.subresource:
        return None
    if (info.group, info.version) != (resource.group, resource.version):
        return None
    return None if info.namespace and not resource.namespaced else resource


def not_found(what: str) -> bytes:
    return status(404, "NotFound", what)


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
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    # --- authentication, authorisation, routing --------------------------------------------------------

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        self.api.requests_raw.append(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._read_body()
        user = self.api.tokens.user(self.headers.get("Authorization"))
        if user is None:
            self.api.refusals.append(f"401 {method} {url.path}")
            self._send(401, UNAUTHORIZED)
            return
        info = request_info(method, url.path, query)
        allowed, reason = self.api.rbac.authorize(user, info)
        if not allowed:
            what = f"{info.verb} {info.resource}" if info.is_resource else f"{info.verb} {info.path}"
            self.api.refusals.append(f"403 {what} {user.name}")
            self._send(403, forbidden(user, info, reason))
            return
        if not info.is_resource:
            self._non_resource(info.path)
            return
        if method == "POST" and (info.group, info.version, info.resource) == _REVIEW:
            self._review(user, body)
            return
        resource = _served(info, method)
        if resource is None:
            self._send(404, not_found("the server could not find the requested resource"))
        else:
            self._resource(resource, info, query)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _non_resource(self, path: str) -> None:
        if path in ("/version", "/version/"):
            self._send(200, json.dumps(version_info(self.api.git_version)).encode())
        elif path in _HEALTH_PATHS:
            self._send(200, b"ok", "text/plain; charset=utf-8")
        else:
            host, port = self.server.server_address[:2]
            doc = document(path, f"{host!s}:{port}")
            self._send(
                *(
                    (200, doc)
                    if doc is not None
                    else (404, not_found("the server could not find the requested resource"))
                )
            )

    def _review(self, user: User, body: bytes) -> None:
        """SelfSubjectAccessReview: `kubectl auth can-i`, answered from the same RBAC."""
        review = json.loads(body or b"{}")
        attrs = (review.get("spec") or {}).get("resourceAttributes")
        plain = (review.get("spec") or {}).get("nonResourceAttributes") or {}
        if attrs:
            asked = Request(
                verb=attrs.get("verb", ""),
                path="",
                resource=attrs.get("resource", ""),
                group=attrs.get("group", ""),
                version=attrs.get("version", "v1"),
                subresource=attrs.get("subresource", ""),
                namespace=attrs.get("namespace", ""),
                name=attrs.get("name", ""),
            )
        else:
            asked = Request(verb=plain.get("verb", ""), path=plain.get("path", ""))
        allowed, _ = self.api.rbac.authorize(user, asked)
        review["status"] = {"allowed": allowed}
        review.setdefault("metadata", {})
        self._send(201, json.dumps(review).encode())

    def _resource(self, resource: ResourceType, info: Request, query: dict[str, str]) -> None:
        namespace = info.namespace or None
        selector = query.get("fieldSelector", "")
        name_in_path = info.name if info.name and info.verb in ("get", "watch") and not selector else ""
        if name_in_path:
            selector = f"metadata.name={name_in_path}"
        try:
            predicate = field_predicate(resource, selector, namespace)
        except ValueError as exc:
            self._send(400, status(400, "BadRequest", str(exc)))
            return
        self.api.requests.append(f"{'watch' if info.verb == 'watch' else info.verb} {resource.name}")
        if info.verb == "watch":
            if self.api.refuse_watches:
                self._send(503, status(503, "ServiceUnavailable", "apiserver is shutting down"))
                return
            self._watch(resource, predicate, query)
        elif info.verb == "get":
            self._get(resource, predicate, info)
        else:
            self._list(resource, predicate, query)

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # --- get, list, watch --------------------------------------------------------------------------------

    def _get(self, resource: ResourceType, predicate: Predicate, info: Request) -> None:
        found = self.api.snapshot(resource.name, predicate).items
        if not found:
            details = {"name": info.name, "kind": resource.name}
            self._send(404, status(404, "NotFound", f'{resource.name} "{info.name}" not found', details))
            return
        self._send(200, found[0])

    def _list(self, resource: ResourceType, predicate: Predicate, query: dict[str, str]) -> None:
        limit = int(query.get("limit") or 0)
        if query.get("continue"):
            token, offset = decode_continue(query["continue"])
            snap = self.api.find_snapshot(token)
            if snap is None:
                self._send(
                    410,
                    status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to "
                        "display a consistent list result. You can start a new list without the continue "
                        "parameter.",
                    ),
                )
                return
        else:
            snap, offset, token = self.api.snapshot(resource.name, predicate), 0, ""
        end = offset + limit if limit else len(snap.items)
        page = snap.items[offset:end]
        meta: dict[str, Any] = {"resourceVersion": str(snap.rv)}
        if end < len(snap.items):
            token = token or self.api.keep_snapshot(snap)
            meta["continue"] = encode_continue(token, end)
            meta["remainingItemCount"] = len(snap.items) - end
        head = {"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": meta}
        self._send(200, json.dumps(head)[:-1].encode() + b',"items":[' + b",".join(page) + b"]}")

    def _watch(self, resource: ResourceType, predicate: Predicate, query: dict[str, str]) -> None:
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
                cursor, current = api.current(resource.name)
                self._chunk(b"".join(_event("ADDED", s.data) for s in current if predicate(s)))
            else:
                cursor = int(version)
            self._stream(resource, predicate, cursor, bookmarks, time.monotonic() + timeout_s)
        except OSError as exc:  # the client went away, or drop_connections() cut the socket
            log.debug("watch stream ended error=%r", exc)

    def _stream(
        self, resource: ResourceType, predicate: Predicate, cursor: int, bookmarks: bool, end: float
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
                    _event(e.type, e.obj.data)
                    for e in events
                    if e.resource == resource.name and predicate(e.obj)
                )
                if data:
                    self._chunk(data)
                    last_write = time.monotonic()
            now = time.monotonic()
            if now >= end:
                self._end()
                return
            if bookmarks and now - last_write >= self.api.bookmark_interval_s:
                mark = {
                    "kind": resource.kind,
                    "apiVersion": resource.api_version,
                    "metadata": {"resourceVersion": str(cursor)},
                }
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
                    self._chunk(_event("ERROR", status(410, "Expired", message)))
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
