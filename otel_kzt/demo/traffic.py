"""Traffic inside the simulated cluster: dual-stack TCP servers and clients running in pod namespaces.

One process, one thread per server and per client. A thread enters its pod's network namespace with
setns(2) (which only moves the calling thread), so every socket it creates lives in that namespace; no
interpreter per pod. The wire protocol is tiny: the client sends an 8-byte header (response size, request
padding size) and the padding; the server answers with exactly that many bytes. Sizes are therefore known
on both sides, and `exchange` gives the tests bounded, deterministic traffic.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from otel_kzt.demo.workloads import Call, Listener
from otel_kzt.errors import KztError
from otel_kzt.netns import netns_path

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
_HEADER = struct.Struct("!II")
_CHUNK = 65536
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class TrafficError(KztError):
    pass


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TrafficError(f"setns into netns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(name: str, fn: Callable[[], T], timeout: float = 120.0) -> T:
    """Run `fn` in a fresh thread inside netns `name` and return its result (re-raising its error)."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            enter_netns(name)
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TrafficError(f"work in netns {name} did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = sock.recv(min(left, _CHUNK))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _send_zeros(sock: socket.socket, size: int) -> None:
    block = bytes(min(size, _CHUNK))
    while size:
        sent = sock.send(block[: min(size, _CHUNK)])
        size -= sent


def request(sock: socket.socket, request_bytes: int, response_bytes: int) -> None:
    """One request/response on a connected socket."""
    pad = max(0, request_bytes - _HEADER.size)
    sock.sendall(_HEADER.pack(response_bytes, pad))
    _send_zeros(sock, pad)
    _recv_exact(sock, response_bytes)


def connect(address: str, port: int, timeout: float = 5.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def exchange(netns: str, address: str, port: int, *, request_bytes: int, response_bytes: int,
             count: int = 1) -> None:
    """Bounded traffic: from `netns`, one connection, `count` requests, then a clean close."""
    def body() -> None:
        with connect(address, port) as sock:
            for _ in range(count):
                request(sock, request_bytes, response_bytes)
            sock.shutdown(socket.SHUT_WR)
            # Wait for the server's FIN so every packet of the exchange has left before we return.
            sock.recv(1)

    run_in_netns(netns, body)


class Engine:
    """Runs listeners and continuous calls until `stop()`; safe to stop twice or before `start()`."""

    def __init__(self, listeners: tuple[Listener, ...], calls: tuple[Call, ...]) -> None:
        self._listeners = listeners
        self._calls = calls
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._failed: list[str] = []
        self.requests_ok = 0
        self.requests_failed = 0

    def start(self) -> None:
        ready: list[threading.Event] = []
        for listener in self._listeners:
            event = threading.Event()
            ready.append(event)
            self._spawn(f"serve-{listener.owner}", functools.partial(self._serve, listener, event))
        for event in ready:
            event.wait(5.0)
        if self._failed:
            self.stop()
            raise TrafficError("servers did not start: " + "; ".join(self._failed))
        for call in self._calls:
            self._spawn(f"call-{call.client.name}", functools.partial(self._call_loop, call))

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                log.debug("socket already closed")
            sock.close()
        for thread in self._threads:
            thread.join(5.0)
        self._threads = []

    def _spawn(self, name: str, fn: Callable[[], None]) -> None:
        thread = threading.Thread(target=fn, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _listen(self, listener: Listener) -> socket.socket:
        enter_netns(listener.netns)
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # one socket, both families
            server.bind(("::", listener.port))
            server.listen(64)
        except OSError:
            server.close()
            raise
        server.settimeout(0.5)
        return server

    def _serve(self, listener: Listener, ready: threading.Event) -> None:
        try:
            server = self._listen(listener)
        except (OSError, TrafficError) as exc:
            self._failed.append(f"{listener.owner} port {listener.port}: {exc}")
            ready.set()
            return
        self._track(server)
        ready.set()
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            self._track(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            serve_connection(conn)
        finally:
            self._untrack(conn)

    def _close(self, sock: socket.socket) -> None:
        self._untrack(sock)
        sock.close()

    def _untrack(self, sock: socket.socket) -> None:
        # Closed sockets leave the list, so a long demo or test session does not pile them up.
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)

    def _call_loop(self, call: Call) -> None:
        try:
            enter_netns(call.client.netns)
        except TrafficError as exc:
            log.error("client not started client=%s error=%s", call.client.name, exc)
            return
        conns: dict[tuple[str, int], socket.socket] = {}
        turn = 0
        due = time.monotonic()
        # A fixed cadence (not sleep-after-work), so the rate is the one asked for whatever a call takes.
        while not self._stop.wait(max(0.0, (due := due + call.period_s) - time.monotonic())):
            target = call.targets[turn % len(call.targets)]
            turn += 1
            try:
                if target not in conns:
                    conns[target] = connect(*target)
                    self._track(conns[target])
                request(conns[target], call.request_bytes, call.response_bytes)
                self.requests_ok += 1
                if call.fresh_connections:
                    self._close(conns.pop(target))
            except OSError as exc:
                self.requests_failed += 1
                log.debug("call failed client=%s target=%s error=%s", call.client.name, target, exc)
                dropped = conns.pop(target, None)
                if dropped is not None:
                    self._close(dropped)
        for sock in conns.values():
            sock.close()


def serve_connection(conn: socket.socket) -> None:
    """Answer requests on one connection until the client closes it."""
    with conn:
        try:
            while True:
                header = conn.recv(_HEADER.size, socket.MSG_WAITALL)
                if len(header) < _HEADER.size:
                    return
                response_bytes, pad = _HEADER.unpack(header)
                if pad:
                    _recv_exact(conn, pad)
                _send_zeros(conn, response_bytes)
        except OSError as exc:
            log.debug("connection ended error=%s", exc)
