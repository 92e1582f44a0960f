"""A tc device whose attach keeps failing (tcwatch.py): retried at every re-scan, warned about at its first
failure and then at most once per FAILED_LOG_EVERY_S with the failures not logged since; hooked (and counted
as added) once an attach succeeds. The kernel side of the re-scan is test_datapath_tc_uplinks.py's."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import devices, tcwatch
from otel_kzt.agent.datapath.devices import Device
from otel_kzt.errors import DatapathError

ENI = Device("eth1", 7, "", "route", ether=True)


class FailingMode:
    """The TcMode surface DeviceWatch uses; attaching fails until `fail_until` attempts were made."""

    patterns: tuple[str, ...] = ()
    node_addresses: tuple[str, ...] = ()

    def __init__(self, fail_until: int) -> None:
        self.hooked: list[Device] = []
        self.attempts, self.fail_until = 0, fail_until

    def attach_device(self, dispatch_fd: int, device: Device, directory: object) -> int:
        self.attempts += 1
        if self.attempts <= self.fail_until:
            raise DatapathError(f"tc: attaching to {device.name}: Device or resource busy")
        return -1  # a classic filter: no link fd

    def release(self, fds: list[int], *, detach: bool) -> None:
        assert fds == []

    def covered(self, device: Device) -> bool:
        return False

    def flags(self, device: Device) -> int:
        return 1


class Flags:
    """The DeviceConfig surface DeviceWatch uses: the flags written, by ifindex."""

    def __init__(self) -> None:
        self.written: dict[int, int] = {}
        self.closed = False

    def set(self, ifindex: int, flags: int) -> None:
        self.written[ifindex] = flags

    def clear(self, ifindex: int) -> None:
        self.written.pop(ifindex, None)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def chosen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Device]]:
    now: list[Device] = [ENI]
    monkeypatch.setattr(devices, "discover", lambda patterns, addresses: list(now))
    monkeypatch.setattr(netns, "entered_fd", lambda fd: contextlib.nullcontext())
    yield now


def watch(mode: FailingMode, clock: list[float], flags: Flags | None = None) -> tcwatch.DeviceWatch:
    dispatch = os.open("/dev/null", os.O_RDONLY)  # stands for the dispatcher's fd: closed by close()
    return tcwatch.DeviceWatch(
        mode,  # type: ignore[arg-type]
        dispatch,
        [],
        [],
        directory=None,
        config=flags or Flags(),  # type: ignore[arg-type]
        clock=lambda: clock[0],
    )


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_failing_device_is_retried_every_interval_and_warned_about_at_most_once_per_period(
    chosen: list[Device], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=tcwatch.__name__)
    mode, clock, flags = FailingMode(fail_until=25), [1000.0], Flags()
    w = watch(mode, clock, flags)
    try:
        for _ in range(20):  # 20 intervals of 10 s: within one period
            assert w.rescan().hooked == 0
            assert flags.written == {}  # written before each attempt, taken back when it fails
            clock[0] += 10.0
        assert mode.attempts == 20
        assert len(warnings(caplog)) == 1
        assert "device=eth1 not_logged=0" in warnings(caplog)[0]
        clock[0] = 1000.0 + tcwatch.FAILED_LOG_EVERY_S
        w.rescan()  # the 21st failure, a period after the first warning
        assert len(warnings(caplog)) == 2
        assert "not_logged=19" in warnings(caplog)[1]
        for _ in range(4):
            w.rescan()
        assert w.counts().hooked == 0 and mode.attempts == 25
        counts = w.rescan()  # the 26th attempt succeeds
        assert (counts.hooked, counts.added) == (1, 1)
        assert flags.written == {ENI.ifindex: 1}
        assert len(warnings(caplog)) == 2
    finally:
        w.close(detach=False)
    assert flags.closed


def test_a_device_gone_while_failing_is_forgotten_and_warned_about_afresh_when_it_comes_back(
    chosen: list[Device], caplog: pytest.LogCaptureFixture
) -> None:
    mode, clock = FailingMode(fail_until=100), [1000.0]
    w = watch(mode, clock)
    try:
        w.rescan()
        w.rescan()
        chosen.clear()  # the ENI detached before it could be hooked
        w.rescan()
        chosen.append(ENI)  # and attached again, within the period
        clock[0] += 10.0
        w.rescan()
        assert [m.split(" error=")[0] for m in warnings(caplog)] == [
            "tc device not hooked, retried next interval device=eth1 not_logged=0"
        ] * 2
    finally:
        w.close(detach=False)
