"""A real grpcio client whose deadline passes while its call waits for a worker of the gRPC receiver: grpcio
still runs our handler for it, and the request iterator raises RpcError there (receivers/grpc.py). That is the
client's doing, not an error of ours: `kzt_enricher_receiver_errors_total` stays 0 (KztEnricherInternalErrors
quiet), and the enricher goes on answering."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from otel_kzt import schema
from otel_kzt.enricher.receivers.grpc import GrpcReceiver
from otel_kzt.enricher.service import EnricherService
from tests.integration.test_enricher_badinput import METRICS_METHOD
from tests.integration.test_enricher_http_wire import request
from tests.integration.test_enricher_service import (
    api_pki,
    enricher_kubeconfig,
    metrics_showing,
    running,
    served_config,
)

__all__ = ["api_pki", "enricher_kubeconfig"]
CALLS = 64  # admitted calls and core requests at once: more than the receiver has workers


@pytest.fixture
def service(enricher_kubeconfig: Path) -> Iterator[EnricherService]:
    config = served_config(enricher_kubeconfig, max_concurrent_calls=CALLS, max_inflight_requests=CALLS)
    with running(config) as svc:
        yield svc


def _free_slots(receiver: GrpcReceiver) -> int:
    """The admission slots free now (each admitted call holds one until its handler has run to its end)."""
    slots, taken = receiver.admission._slots, 0
    while taken < CALLS and slots.acquire(blocking=False):
        taken += 1
    for _ in range(taken):
        slots.release()
    return taken


def _until_free(receiver: GrpcReceiver, free: int) -> None:
    for _ in range(600):
        if _free_slots(receiver) == free:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"admission slots free: {_free_slots(receiver)}, never {free}")


@pytest.mark.integration
def test_a_deadline_that_passes_behind_held_workers_is_no_error_of_ours(
    service: EnricherService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many workers the receiver has (fewer than CALLS - 1): CALLS - 1 real requests blocked in the
    core on its aggregates lock hold them all and queue the rest; the late call is admitted behind them."""
    [receiver] = [part for kind, part in service._stoppers if kind == "grpc"]
    assert isinstance(receiver, GrpcReceiver)
    core = service.core
    assert core is not None
    consume, entered = core.consume_encoded, []

    def counted(raw: bytes, decode: object) -> object:
        entered.append(raw)  # a worker is in the core
        return consume(raw, decode)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "consume_encoded", counted)
    holders = CALLS - 1
    with grpc.insecure_channel(f"127.0.0.1:{service.ports['grpc']}") as channel:
        call = channel.unary_unary(METRICS_METHOD)
        with core._agg.lock:
            held = [call.future(request(100 + i), timeout=60) for i in range(holders)]
            _until_free(receiver, 1)  # every held request admitted, handed to the workers' queue
            late = call.future(request(99), timeout=0.5)
            with pytest.raises(grpc.RpcError) as caught:
                late.result(timeout=30)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert _free_slots(receiver) == 0  # the late call was admitted; its handler has not ended
            assert len(entered) < holders  # some held requests still wait for a worker: none was free
        for future in held:
            future.result(timeout=30)  # each answered OK
        _until_free(receiver, CALLS)  # the late call's handler ran (the request iterator raised), ended
        assert request(99) not in entered and len(entered) == holders  # the late call never reached the core
        call(request(300), timeout=10)  # the enricher still answers
    metrics = f"http://127.0.0.1:{service.ports['metrics']}/metrics"
    body = metrics_showing(metrics, f"{schema.ENRICHER_RECEIVED_POINTS}_total {holders + 1}.0")
    assert f'{schema.ENRICHER_RECEIVER_ERRORS}_total{{receiver="grpc"}} 0.0' in body
