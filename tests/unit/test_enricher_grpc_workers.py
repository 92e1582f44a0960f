"""`grpc_workers` is the number of gRPC calls served at once: admitted calls beyond it wait for a worker
and are answered when one is free (none is refused or lost)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc

from otel_kzt.enricher.receivers.grpc import METRICS_METHOD, GrpcReceiver
from otel_kzt.enricher.receivers.settings import ReceiverSettings


class _BlockingCore:
    """Holds every request until released, noting how many are inside at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = self.most = self.done = 0
        self.release = threading.Event()
        self.two_inside = threading.Event()

    def consume_encoded(self, _raw: bytes, _decode: object) -> SimpleNamespace:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            if self.inside == 2:
                self.two_inside.set()
        assert self.release.wait(10)
        with self.lock:
            self.inside -= 1
            self.done += 1
        return SimpleNamespace(rejected=0, message="")


def test_calls_beyond_the_workers_wait_for_one_and_are_all_answered() -> None:
    core = _BlockingCore()
    receiver = GrpcReceiver(ReceiverSettings("127.0.0.1", 0, grpc_workers=2), core)  # type: ignore[arg-type]
    port = receiver.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            export = channel.unary_unary(METRICS_METHOD)
            with ThreadPoolExecutor(5) as pool:
                calls = [pool.submit(export, b"", timeout=20) for _ in range(5)]
                assert core.two_inside.wait(10)
                threading.Event().wait(0.5)  # time for a third worker, were there one
                assert core.inside == 2
                core.release.set()
                answers = [call.result() for call in calls]
        assert answers == [b""] * 5 and core.done == 5 and core.most == 2
    finally:
        core.release.set()
        receiver.shutdown(1)
