"""One aiohttp application served on its own thread and event loop, with the guards every port needs.

Why aiohttp: one event loop holds thousands of idle or slow connections for the price of a socket each
(http.server spends a thread per connection), and it speaks HTTP/1.1 fully: chunked bodies, keep-alive,
pipelining. The guards:
- a connection cap: beyond `max_connections` a new connection gets `503` + `Retry-After` and is closed;
- a header timeout: a connection that has not sent a whole request head within `header_timeout_s` of
  connecting (or of its last answer: the keep-alive idle time) is closed (aiohttp's keep-alive timer);
- the TLS handshake bounded by the same timeout, and the certificate reloaded when its files change;
- lingering: a body left unread after an early answer (401, 413, 503) is drained for up to `lingering_s`,
  so the client reads the answer instead of a connection reset.
Handlers never block the loop: request work runs on `run_blocking`'s worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Protocol, TypeVar

from aiohttp import web

from otel_kzt.serving.limits import HttpLimits

log = logging.getLogger(__name__)
T = TypeVar("T")

_OVER_CAP: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 31\r\nConnection: close\r\n\r\ntoo many connections, retry.\r\n\r\n"
)
_OVER_CAP_LINGER_S: Final = 2.0


class ServerTls(Protocol):
    """A server's TLS context, brought up to date (a renewed certificate) before each handshake."""

    context: ssl.SSLContext

    def refresh(self) -> ssl.SSLContext: ...


class _Gate:
    """Counts open connections of one port (a lock: a place may be given back by the garbage collector)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open, self.refused = limit, 0, 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                self.refused += 1
                return False
            self.open += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.open -= 1


class _Counted(asyncio.Protocol):
    """Forwards to aiohttp's protocol; holds its place in the gate (taken at accept) until the connection is
    lost. A TLS connection whose handshake fails (plain text to the TLS port, a scanner) never reaches
    `connection_made` nor `connection_lost`: its place is given back once the handshake deadline passed."""

    def __init__(self, inner: asyncio.Protocol, gate: _Gate, handshake_s: float | None) -> None:
        self._inner, self._gate, self._held, self._made = inner, gate, True, False
        if handshake_s is not None:
            asyncio.get_running_loop().call_later(handshake_s + 0.5, self._unless_made)

    def _give_back(self) -> None:
        if self._held:
            self._held = False
            self._gate.give()

    def _unless_made(self) -> None:
        if not self._made:
            self._give_back()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._give_back()
        self._inner.connection_lost(exc)


class _OverCap(asyncio.Protocol):
    """Answers 503 at once, reads and ignores what the client sends, closes soon after."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_OVER_CAP)
        asyncio.get_running_loop().call_later(_OVER_CAP_LINGER_S, transport.close)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        """Ignored: the answer is already written."""

    def eof_received(self) -> bool:
        self._transport.close()
        return False


class AsyncHttpServer:
    """Start/stop: `start()` binds and returns the port; `shutdown()` is idempotent and safe before start."""

    def __init__(
        self,
        name: str,
        app: web.Application,
        *,
        host: str,
        port: int,
        limits: HttpLimits,
        tls: ServerTls | None = None,
        workers: int = 4,
    ) -> None:
        self.name, self._app, self._host, self._port = name, app, host, port
        self._limits, self._tls = limits, tls
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"kzt-{name}-work")
        self._gate = _Gate(limits.max_connections)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def connections(self) -> int:
        return self._gate.open

    @property
    def refused_connections(self) -> int:
        return self._gate.refused

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on this port's worker threads; the loop goes on serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def start(self) -> int:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name=f"kzt-{self.name}", daemon=True)
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self._open(), loop).result()
        except BaseException:
            self.shutdown()
            raise

    async def _open(self) -> int:
        limits = self._limits
        self._runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,  # answers in progress may finish; within the service's shutdown deadline
            keepalive_timeout=limits.header_timeout_s,
            lingering_time=limits.lingering_s,
            auto_decompress=False,  # ours to do, with the size limit applied after decompression
        )
        await self._runner.setup()
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol,
            self._host,
            self._port,
            ssl=self._tls.context if self._tls else None,
            ssl_handshake_timeout=limits.header_timeout_s if self._tls else None,
            reuse_address=True,
            backlog=1024,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> asyncio.Protocol:
        gate = self._gate
        if not gate.take():
            if gate.refused % 1000 == 1:
                log.warning("connection refused: port=%s max_connections=%d", self.name, gate.limit)
            return _OverCap()
        if self._tls is not None:
            self._tls.refresh()  # a renewed certificate serves this handshake already
        assert self._runner is not None and self._runner.server is not None
        handshake_s = self._limits.header_timeout_s if self._tls is not None else None
        return _Counted(self._runner.server(), gate, handshake_s)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def shutdown(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        except Exception:
            log.exception("http server shutdown: port=%s", self.name)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            loop.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
