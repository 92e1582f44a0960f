"""The gRPC receiver's answer to an exception: an error of ours is `retry later` and counted; our own aborts
and a call that ended on the client's side (cancelled while it waited for a worker) are neither."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from otel_kzt.enricher.receivers.grpc import _Admission


class _Aborted(Exception):
    pass


class _Context:
    """What the admission wrapper uses of a grpc.ServicerContext."""

    def __init__(self) -> None:
        self.status: grpc.StatusCode | None = None
        self.trailers: tuple[tuple[str, bytes], ...] = ()

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def set_trailing_metadata(self, trailers: tuple[tuple[str, bytes], ...]) -> None:
        self.trailers = trailers

    def abort(self, code: grpc.StatusCode, _details: str) -> None:
        self.status = code
        raise _Aborted()


def _run(behaviour: object, requests: Iterator[bytes]) -> tuple[_Admission, _Context]:
    admission = _Admission({"/m": behaviour}, limit=1)  # type: ignore[dict-item]
    context = _Context()
    run = admission._admitted("/m", behaviour)  # type: ignore[arg-type]
    assert admission._slots.acquire(blocking=False)  # as service() does before handing the call over
    with pytest.raises(Exception) as raised:
        run(requests, context)  # type: ignore[arg-type]
    assert admission._slots.acquire(blocking=False), "the slot was given back"
    admission._slots.release()
    context.raised = raised.value  # type: ignore[attr-defined]
    return admission, context


def test_an_error_of_ours_is_answered_unavailable_with_retry_info_and_counted() -> None:
    def broken(_raw: bytes, _context: object) -> bytes:
        raise IndexError("a bug")

    admission, context = _run(broken, iter([b"x"]))
    assert context.status == grpc.StatusCode.UNAVAILABLE
    assert dict(context.trailers)["grpc-status-details-bin"]
    assert admission.errors.value == 1


def test_our_own_abort_is_not_an_error() -> None:
    def refusing(_raw: bytes, context: _Context) -> bytes:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "undecodable")
        raise AssertionError("abort raises")

    admission, context = _run(refusing, iter([b"x"]))
    assert context.status == grpc.StatusCode.INVALID_ARGUMENT
    assert admission.errors.value == 0


def test_a_call_the_client_cancelled_is_not_an_error() -> None:
    def cancelled() -> Iterator[bytes]:
        raise grpc.RpcError()  # what grpcio's request iterator raises for a cancelled call
        yield b""  # pragma: no cover

    admission, context = _run(lambda _raw, _context: b"", cancelled())
    assert isinstance(context.raised, grpc.RpcError)  # type: ignore[attr-defined]
    assert context.status is None and admission.errors.value == 0
