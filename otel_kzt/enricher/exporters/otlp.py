"""Downstream OTLP exporters: queue, batch, consumers, as the Collector's exporter helper does.

Payloads arrive already serialised (the core encodes a request once for every exporter). Each request is
cut into its resources (a serialised request is the concatenation of its `resource_metrics` fields, so the
pieces are requests too) and each piece queued on the shard of its resource: one agent's series always go
through the same consumer, so their points reach the downstream in order, retries included. A consumer
sends what its shard holds as one request (concatenated, up to `batch_bytes`, waiting up to `batch_linger`
for a fuller batch, like the Collector's batch processor), several consumers at once.

`accepting()` is the back-pressure: while the queue is above its high-water mark and the downstream is
alive (it accepted something within `max_elapsed`), the receivers answer `retry later` before the core
counts anything, so agents resend their cumulative totals instead of the exporter dropping them. A dead
downstream never blocks receiving: then a full queue drops and counts, as before. Retries back off
exponentially on retryable answers only (`otel_kzt.otlp_failures.classify`); a consumer survives any
exception a transport raises (counted, logged, treated as a transport failure).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from otel_kzt.enricher.config import PROTOCOL_HTTP, ExporterConfig
from otel_kzt.enricher.exporters.otlp_transport import LOGS, METRICS, GrpcTransport, HttpTransport, Transport
from otel_kzt.enricher.exporters.prometheus import HealthMetrics
from otel_kzt.enricher.processing.protowire import spans
from otel_kzt.errors import ExportError, RetryableExportError
from otel_kzt.otlp_failures import classify

log = logging.getLogger(__name__)

__all__ = ["LOGS", "METRICS", "Exporter", "Transport"]
_BACKOFF_INITIAL_S: Final = 0.5
_BACKOFF_MAX_S: Final = 10.0
_HIGH_WATER: Final = 0.8  # of queue_size / queue_bytes: above it, back-pressure
# An idle consumer wakes this often to look at the shutdown flags; shutdown wakes every consumer at once
# (a poll of 0.1 s cost an idle enricher ~2 ms CPU per second, and every measured interval as much)
_IDLE_WAIT_S: Final = 5.0
_RM_RESOURCE: Final = 1  # ResourceMetrics.resource / ResourceLogs.resource

TransportFactory = Callable[[ExporterConfig], Transport]


@dataclass(slots=True)
class _Item:
    signal: str
    payload: bytes
    queued_at: float


class _Shard:
    """One consumer's FIFOs, one per signal (no order is kept between metrics and logs)."""

    def __init__(self, limit: int) -> None:
        self.items: dict[str, deque[_Item]] = {METRICS: deque(), LOGS: deque()}
        self.size = {METRICS: 0, LOGS: 0}
        self.ready = threading.Condition()
        self._limit = limit  # a batch's bytes

    def __len__(self) -> int:
        return sum(len(q) for q in self.items.values())

    def put(self, item: _Item) -> None:
        """Queue `item`; the consumer is woken only when that changes what it waits for: the first item
        (it waits for one) or a full batch (it lingers for one). Each wake-up of a waiting thread costs
        both threads a futex call and a GIL hand-over: ~0.1 ms of a receiver's worker per request."""
        with self.ready:
            first = not len(self)
            self.items[item.signal].append(item)
            self.size[item.signal] += len(item.payload)
            if first or self.size[item.signal] >= self._limit:
                self.ready.notify()

    def take_batch(self, linger_s: float, wait_s: float, closing: threading.Event) -> list[_Item]:
        """The oldest signal's items, up to a batch's bytes (at least one item). Waits up to `linger_s`
        after the first item for a fuller batch: fewer, larger requests cost the downstream and us less."""
        limit = self._limit
        with self.ready:
            # closing is read under the lock that shutdown's wake-up takes: no wake-up is missed
            if not len(self) and (closing.is_set() or not self.ready.wait(wait_s)) and not len(self):
                return []
            heads = [q[0] for q in self.items.values() if q]
            if not heads:
                return []
            signal = min(heads, key=lambda i: i.queued_at).signal
            linger_until = self.items[signal][0].queued_at + linger_s
            while self.size[signal] < limit and not closing.is_set():
                left = linger_until - time.monotonic()
                if left <= 0:
                    break
                self.ready.wait(left)
            queue, size = self.items[signal], 0
            batch: list[_Item] = []
            while queue and (not batch or size + len(queue[0].payload) <= limit):
                item = queue.popleft()
                size += len(item.payload)
                batch.append(item)
            self.size[signal] -= size
            return batch


def _pieces(payload: bytes) -> list[tuple[int, bytes]]:
    """(shard key, piece) per top-level resource of a serialised request; what cannot be cut goes whole.
    Walked by offsets: a request of one resource (an agent's) is its own piece, nothing copied (each copy
    of a megabyte request costs as much as its re-assembly)."""
    try:
        fields = list(spans(payload, 0, len(payload)))
        out = []
        for _number, start, body, end in fields:
            resource = next(
                (payload[b:e] for n, _s, b, e in spans(payload, body, end) if n == _RM_RESOURCE), b""
            )
            out.append((zlib.crc32(resource), payload if len(fields) == 1 else payload[start:end]))
        return out
    except (IndexError, ValueError):
        return [(0, payload)]


class Exporter:
    """One endpoint: a bounded, sharded queue, `consumers` workers, retries, counted drops."""

    def __init__(
        self,
        cfg: ExporterConfig,
        health: HealthMetrics,
        transport: TransportFactory | None = None,
        backoff_s: float = _BACKOFF_INITIAL_S,
    ) -> None:
        self.name = cfg.endpoint
        self._cfg, self._health, self._backoff_s = cfg, health, backoff_s
        self._factory = transport or (HttpTransport if cfg.protocol == PROTOCOL_HTTP else GrpcTransport)
        self._shards = [_Shard(cfg.batch_bytes) for _ in range(cfg.consumers)]
        self._lock = threading.Lock()
        self._items = self._bytes = 0  # queued, all shards
        self._closing = threading.Event()  # no new retries; drain what is queued
        self._abort = threading.Event()  # the shutdown deadline passed
        self._threads: list[threading.Thread] = []
        self._last_success = time.monotonic()
        self._failing = False  # the last attempt failed
        self._last_drop_log = 0.0
        self._logs_turn = 0

    def start(self) -> None:
        for n, shard in enumerate(self._shards):
            thread = threading.Thread(
                target=self._run, args=(shard,), name=f"kzt-export-{n}-{self.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def accepting(self) -> bool:
        """False while the queue is above its high-water mark and the downstream is alive."""
        cfg = self._cfg
        if self._items < _HIGH_WATER * cfg.queue_size and self._bytes < _HIGH_WATER * cfg.queue_bytes:
            return True
        return self._dead()

    def _dead(self) -> bool:
        return self._failing and time.monotonic() - self._last_success > self._cfg.max_elapsed_s

    def submit_metrics(self, payload: bytes) -> None:
        for key, piece in _pieces(payload):
            self._enqueue(key, _Item(METRICS, piece, time.monotonic()))

    def submit_logs(self, payload: bytes) -> None:
        self._logs_turn += 1  # flow-log records carry no order worth keeping: spread them
        self._enqueue(self._logs_turn, _Item(LOGS, payload, time.monotonic()))

    def _enqueue(self, key: int, item: _Item) -> None:
        size = len(item.payload)
        with self._lock:
            full = self._items + 1 > self._cfg.queue_size or self._bytes + size > self._cfg.queue_bytes
            if not full:
                self._items += 1
                self._bytes += size
        if full:
            self._drop(f"queue full (queue_size={self._cfg.queue_size}, queue_bytes={self._cfg.queue_bytes})")
            return
        self._shards[key % len(self._shards)].put(item)

    def _drop(self, why: str, count: int = 1) -> None:
        self._health.export_dropped.labels(self.name).inc(count)
        now = time.monotonic()
        if now - self._last_drop_log > 10.0:
            self._last_drop_log = now
            log.warning("export dropped: exporter=%s items=%d reason=%s", self.name, count, why)

    def _run(self, shard: _Shard) -> None:
        transport = self._factory(self._cfg)
        try:
            while not self._abort.is_set():
                batch = shard.take_batch(self._cfg.batch_linger_s, _IDLE_WAIT_S, self._closing)
                if not batch:
                    if self._closing.is_set():
                        return
                    continue
                try:
                    self._deliver(transport, batch)
                except Exception:  # never lose the consumer, whatever happened
                    log.exception("export consumer error: exporter=%s", self.name)
                    self._drop("internal error", len(batch))
                finally:
                    with self._lock:
                        self._items -= len(batch)
                        self._bytes -= sum(len(i.payload) for i in batch)
        finally:
            transport.close()

    def _send(self, transport: Transport, signal: str, payload: bytes) -> None:
        try:
            transport.send(signal, payload)
        except ExportError:
            raise
        except Exception as exc:  # a transport bug or an exception nobody translated: a transport failure
            log.exception("export transport raised: exporter=%s", self.name)
            raise classify(None, f"{type(exc).__name__}: {exc}") from exc

    def _deliver(self, transport: Transport, batch: list[_Item]) -> None:
        signal, payload = batch[0].signal, b"".join(i.payload for i in batch)
        deadline = time.monotonic() + self._cfg.max_elapsed_s
        delay = self._backoff_s
        while True:
            try:
                self._send(transport, signal, payload)
                self._last_success, self._failing = time.monotonic(), False
                return
            except ExportError as exc:
                self._failing = True
                self._health.export_failures.labels(self.name).inc()
                retryable = isinstance(exc, RetryableExportError)
                wait = exc.retry_after_s if isinstance(exc, RetryableExportError) else None
                wait = delay * (0.5 + random.random()) if wait is None else wait
                if not retryable or self._closing.is_set():
                    self._drop(f"{exc} (not retried)", len(batch))
                    return
                if time.monotonic() + wait > deadline:
                    self._drop(f"{exc} (retries exhausted after {self._cfg.max_elapsed_s:.0f}s)", len(batch))
                    return
                log.info(
                    "export retry: exporter=%s signal=%s delay=%.2fs error=%s", self.name, signal, wait, exc
                )
                if self._closing.wait(wait):
                    self._drop(f"{exc} (shutting down)", len(batch))
                    return
                delay = min(delay * 2, _BACKOFF_MAX_S)

    def _wake(self) -> None:
        for shard in self._shards:
            with shard.ready:
                shard.ready.notify_all()

    def shutdown(self, timeout_s: float) -> None:
        """Stop retrying, send what is queued until `timeout_s`, count the rest as dropped. Idempotent."""
        self._closing.set()
        self._wake()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        self._wake()
        for thread in self._threads:
            thread.join(1.0)
        self._threads = []
        left = 0
        for shard in self._shards:
            with shard.ready:
                left += len(shard)
                for queue in shard.items.values():
                    queue.clear()
        if left:
            self._drop("shutdown deadline", left)
