"""A small Kubernetes API server for tests that authenticates and authorises like the real one.

It serves pods, nodes, services (`/api/v1/...`), EndpointSlices (`/apis/discovery.k8s.io/v1/...`), the
discovery documents, `/version` and the health paths, and speaks enough of the real protocol for the real
`kubernetes` client to list and watch through it:

- TLS with `tls_dir=`: a private CA (`ca_file`) and a serving certificate for the listening address, which
  clients verify (`https://`; kubeconfigs name the CA, in-cluster clients read it as `ca.crt`);
- authentication: bearer tokens of the ServiceAccounts in `deploy/rbac.yaml` (`token(AGENT)`), an admin
  token (`system:masters`), anonymous without a header, `401` for any other token; `rotate_token(AGENT)`
  replaces one, refusing the old one from then on (a bound token replaced by kubelet, the worst case);
- authorisation: RBAC from the same `deploy/rbac.yaml` the deploy tests validate (plus the bootstrap roles
  every cluster has: discovery, basic-user, public-info); `403` with the real `Status` for the rest;
- list: `limit` + `continue` pages served from a consistent snapshot, `metadata.resourceVersion`;
  an expired `continue` (snapshot gone, or older than the retained history) answers `410 Gone`;
- watch (`watch=1`): chunked newline-delimited ADDED / MODIFIED / DELETED events after `resourceVersion`
  (or the current state as ADDED when none is given), BOOKMARKs with `allowWatchBookmarks`,
  `timeoutSeconds`, and an ERROR event holding a `Status` with code 410 when the version is older than the
  retained history;
- `fieldSelector` on the fields the real server supports per resource (`=`, `==`, `!=`).

Tests drive it with `add` / `update` / `delete`, force `410` with `compact()`, cut every open connection
with `drop_connections()`, change the rules with `set_rbac()`, and point a client at it as a component
with `write_kubeconfig(path, AGENT)`:

    with FakeApiServer() as api:
        api.add(make_node(...))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", ENRICHER)
"""

from __future__ import annotations

import bisect
import json
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tests.support.k8s_handler import ApiHandler
from tests.support.k8s_rbac import Rbac, Tokens
from tests.support.k8s_resources import KINDS, RESOURCES
from tests.support.tls import Issuer

# The components' identities, as deploy/rbac.yaml creates them: (namespace, ServiceAccount).
AGENT = ("otel-kzt", "otel-kzt-agent")
ENRICHER = ("otel-kzt", "otel-kzt-enricher")
ADMIN = ("", "admin")  # system:masters: for tests that drive the server itself, never for a component
DEFAULT_VERSION = "v1.34.1"


@dataclass(frozen=True, slots=True)
class Stored:
    """One object as served: pre-encoded JSON plus the fields selectors look at."""

    rv: int
    namespace: str
    name: str
    fields: tuple[tuple[str, str], ...]  # every selectable field's value (see k8s_resources)
    data: bytes

    def field(self, name: str) -> str:
        return next((value for key, value in self.fields if key == name), "")


@dataclass(frozen=True, slots=True)
class Event:
    rv: int
    resource: str
    type: str
    obj: Stored


@dataclass(frozen=True, slots=True)
class Snapshot:
    rv: int
    items: list[bytes]


def _pki(tls_dir: Path, ips: tuple[str, ...]) -> Path:
    """A CA and a serving certificate for `ips` under `tls_dir`, made once: servers given the same directory
    (a session's, say) share them, as a cluster's API servers share its CA (openssl costs ~1 s a pair)."""
    pki = tls_dir / "-".join(ips)
    if not (pki / "serving.key").exists():
        issuer = Issuer(pki)
        crt, key = issuer.issue("kubernetes.default.svc", ips)
        (pki / "serving.crt").write_bytes(crt)
        (pki / "serving.key").write_bytes(key)  # last: its presence says the set is complete
    return pki


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread: nothing is left running
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, api: FakeApiServer) -> None:
        self.api = api
        super().__init__((api.host, 0), ApiHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        if self.api.ssl_context is not None:  # the handshake happens in the handler's thread, on first read
            conn = self.api.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLError):  # a client refused the certificate (or spoke plain HTTP)
            self.api.tls_failures.append(str(exc.reason))
            return
        super().handle_error(request, client_address)


class FakeApiServer:
    """Pods, nodes, Services and EndpointSlices behind a real-protocol HTTP API on <host>:<ephemeral>."""

    def __init__(
        self,
        *,
        history_limit: int = 100_000,
        bookmark_interval_s: float = 0.5,
        snapshots_kept: int = 16,
        rbac: Rbac | None = None,
        git_version: str = DEFAULT_VERSION,
        host: str = "127.0.0.1",  # another local address: reachable from network namespaces (e2e nodes)
        tls_dir: Path | None = None,  # serve HTTPS with the CA and certificate kept there (made if absent)
        tls_ips: tuple[str, ...] = (),  # more addresses the certificate is valid for (`via` addresses)
    ) -> None:
        self.host = host
        self.ca_file: Path | None = None
        self.ssl_context: ssl.SSLContext | None = None
        if tls_dir is not None:
            ips = tuple(dict.fromkeys(["127.0.0.1", *([host] if host != "0.0.0.0" else []), *tls_ips]))
            pki = _pki(Path(tls_dir), ips)
            self.ca_file = pki / "ca.crt"
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl_context.load_cert_chain(pki / "serving.crt", pki / "serving.key")
        self.rbac = rbac if rbac is not None else Rbac.shipped()
        self.tokens = Tokens(self.rbac.service_accounts)
        self.git_version = git_version
        self.tls_failures: list[str] = []  # handshakes that failed: "TLSV1_ALERT_UNKNOWN_CA"
        self.refusals: list[str] = []  # "403 list nodes system:serviceaccount:…", "401 GET /api/v1/pods"
        self.history_limit = history_limit
        self.bookmark_interval_s = bookmark_interval_s
        self._snapshots_kept = snapshots_kept
        self.cond = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], Stored]] = {name: {} for name in RESOURCES}
        self.events: list[Event] = []
        self._rv = 1000
        self.compacted_rv = 1000  # watching or continuing from a version older than this is 410 Gone
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._connections: set[socket.socket] = set()
        self.drop_epoch = 0
        self.stopping = False
        self.requests: list[str] = []  # "list pods", "watch nodes" … in arrival order, for assertions
        self.requests_raw: list[str] = []  # request paths with their query strings
        # Fault injection: while `refuse_watches` is set a watch gets 503 (an API server mid-restart);
        # the next `fail_continues` continue requests get 410 as if their snapshot had expired.
        self.refuse_watches = False
        self.fail_continues = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-apiserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        server.shutdown()
        self.drop_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host!s}:{port}"

    @property
    def scheme(self) -> str:
        return "http" if self.ssl_context is None else "https"

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    def token(self, account: tuple[str, str]) -> str:
        """The bearer token of `account` (AGENT, ENRICHER, ADMIN, or another ServiceAccount of the RBAC)."""
        return self.tokens.admin if account == ADMIN else self.tokens.token(*account)

    def rotate_token(self, account: tuple[str, str]) -> str:
        """A new token for `account`, the old one refused from the next request on (open watches go on, as
        a real server authenticates a request once); returns the new token."""
        return self.tokens.rotate(*account)

    def write_kubeconfig(self, path: str | Path, account: tuple[str, str], server: str | None = None) -> str:
        """A kubeconfig that points the client at this server (or `server`) as `account`; returns the path."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": self._cluster(server or self.url)}],
            "users": [{"name": account[1], "user": {"token": self.token(account)}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": account[1]}}],
            "current-context": "fake",
        }
        Path(path).write_text(yaml.safe_dump(config))
        return str(path)

    def _cluster(self, server: str) -> dict[str, str]:
        ca = {} if self.ca_file is None else {"certificate-authority": str(self.ca_file)}
        return {"server": server, **ca}

    def client(self, path: str | Path, account: tuple[str, str]) -> k8s_client.ApiClient:
        """The real client, as `account`, through a kubeconfig at `path` (as the components load it)."""
        configuration = k8s_client.Configuration()
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=self.write_kubeconfig(path, account), client_configuration=configuration
        )
        return k8s_client.ApiClient(configuration)

    def set_rbac(self, rbac: Rbac) -> None:
        """New rules from the next request on (tokens stay valid: the accounts are the same)."""
        self.rbac = rbac

    # --- objects -----------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._put(obj, "ADDED")

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._put(obj, "MODIFIED")

    def add_many(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            self._put(obj, "ADDED")

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        resource = KINDS[kind]
        with self.cond:
            key = (namespace or "", name)
            old = self._objects[resource].pop(key)
            self._rv += 1
            obj = json.loads(old.data)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            gone = Stored(self._rv, old.namespace, old.name, old.fields, json.dumps(obj).encode())
            self._record(Event(self._rv, resource, "DELETED", gone))

    def objects(self, kind: str) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(s.data) for s in self._objects[KINDS[kind]].values()]

    def _put(self, obj: dict[str, Any], event_type: str) -> dict[str, Any]:
        resource = KINDS[obj["kind"]]
        meta = obj["metadata"]
        namespace = meta.get("namespace", "") if RESOURCES[resource].namespaced else ""
        key = (namespace, meta["name"])
        with self.cond:
            exists = key in self._objects[resource]
            if exists != (event_type == "MODIFIED"):
                raise KeyError(f"{obj['kind']} {key} {'exists' if exists else 'does not exist'}")
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            meta.setdefault("uid", str(uuid.uuid4()))
            fields = RESOURCES[resource].field_values(obj)
            stored = Stored(self._rv, namespace, meta["name"], fields, json.dumps(obj).encode())
            self._objects[resource][key] = stored
            self._record(Event(self._rv, resource, event_type, stored))
        return obj

    def _record(self, event: Event) -> None:
        self.events.append(event)
        # Trimmed in batches of a tenth: one front deletion per event would cost O(history) each.
        if len(self.events) > self.history_limit + self.history_limit // 10:
            cut = len(self.events) - self.history_limit
            self.compacted_rv = self.events[cut - 1].rv
            del self.events[:cut]
        self.cond.notify_all()

    # --- test controls -----------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget all history: any watch or `continue` from a version before now gets 410 Gone."""
        with self.cond:
            self.compacted_rv = self._rv
            self.events.clear()
            self._snapshots.clear()

    def drop_connections(self) -> None:
        """Cut every open client connection (watches end mid-stream, as when an API server restarts)."""
        with self.cond:
            connections = list(self._connections)
            self.drop_epoch += 1
            self.cond.notify_all()
        for conn in connections:
            try:  # the socket's own shutdown: an SSLSocket's would unwrap it under its handler's feet
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                continue  # already closed by the other side: nothing left to cut

    def wait_for_watchers(self, resource: str, count: int, timeout_s: float = 10.0) -> None:
        """Block until `count` watch requests on `resource` have arrived in total."""
        deadline = time.monotonic() + timeout_s
        while sum(1 for r in list(self.requests) if r == f"watch {resource}") < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} watches on {resource}: {self.requests}")
            time.sleep(0.01)

    # --- used by the handler -----------------------------------------------------------------------------

    def track(self, conn: socket.socket, add: bool) -> None:
        with self.cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def snapshot(self, resource: str, predicate: Any) -> Snapshot:
        with self.cond:
            stored = self._objects[resource]
            items = [stored[key].data for key in sorted(stored) if predicate(stored[key])]
            return Snapshot(self._rv, items)

    def current(self, resource: str) -> tuple[int, list[Stored]]:
        with self.cond:
            return self._rv, list(self._objects[resource].values())

    def keep_snapshot(self, snap: Snapshot) -> str:
        token = uuid.uuid4().hex
        with self.cond:
            self._snapshots[token] = snap
            while len(self._snapshots) > self._snapshots_kept:
                self._snapshots.popitem(last=False)
        return token

    def find_snapshot(self, token: str) -> Snapshot | None:
        with self.cond:
            if self.fail_continues > 0:
                self.fail_continues -= 1
                return None
            snap = self._snapshots.get(token)
            if snap is None or snap.rv < self.compacted_rv:
                return None
            return snap

    def events_after(self, rv: int) -> list[Event]:
        """Events newer than `rv` (caller holds `cond`)."""
        start = bisect.bisect_right(self.events, rv, key=lambda e: e.rv)
        return self.events[start:]
