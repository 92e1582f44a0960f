"""A restart that changes `--datapath` keeps totals exact (DESIGN §3a): the flow maps carry on, the
attachments change, every mode is the one before and the one after once.

Pod A's UDP to pod B passes every mode (tc hooks both node devices, cgroup's root holds the senders), so
its totals must equal everything sent: while a mode runs, while the agent is down (the pinned mode keeps
counting), and after the switch, with a quiet moment at the switch itself (for that moment both modes may
count: DESIGN §3a, modeswitch.py). Double counting after the switch (the old attachment left behind) or
a reset (another map, another start time) fails the totals or the first-seen time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_kzt.agent.datapath import modes
from tests.kernel.conftest import PIN_ROOT, DatapathFactory, Net, joined_cgroup, settle
from tests.kernel.test_datapath import UDP, key

pytestmark = pytest.mark.kernel

UDP_V4 = 20 + 8


@pytest.fixture
def cgroup_root(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here may run cgroup mode: the test joins a cgroup of its own, the cgroup root."""
    with joined_cgroup("kd-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40]) as path:
        yield str(path)


def _attachments(pin_dir: Path) -> dict[str, list[str]]:
    """The node directory's attachment pins, by the mode they belong to."""
    names = sorted(p.name for p in pin_dir.iterdir())
    return {m: [n for n in names if mode.owns_pin(n)] for m, mode in modes.MODES.items()}


@pytest.mark.parametrize(
    "chain", [("netfilter", "tc", "cgroup", "netfilter"), ("netfilter", "cgroup", "tc", "netfilter")]
)
def test_switching_modes_keeps_totals_and_series(
    net: Net,
    datapath: DatapathFactory,
    cgroup_root: str,
    chain: tuple[str, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    net.drop_udp_at(net.pod_b)
    flow = key(net.a4, net.b4, UDP, dport=53)
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        net.traffic(net.pod_a, "udp", net.b4, 53, count, 10)
        sent += count

    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    first_seen = None
    for step, mode in enumerate(chain):
        dp = datapath(mode=mode, cgroup_root=cgroup_root)  # a restart: the previous one was closed, pinned
        if step:
            assert f"datapath mode changes to {mode}" in caplog.text
        pin_dir = next(Path(PIN_ROOT).glob(dp.config.node_name))
        attached = _attachments(pin_dir)
        assert all(not names for m, names in attached.items() if m != mode), attached  # the old ones went
        assert attached[mode], attached
        settle()  # the quiet moment is over: from here only this mode counts
        send(7 + step)
        settle()
        got = dp.snapshot().flows[flow]
        assert (got.bytes, got.packets) == (sent * (UDP_V4 + 10), sent), f"{mode} after {chain[:step]}"
        if first_seen is None:
            first_seen = got.first_seen_unix_ns
        assert got.first_seen_unix_ns == first_seen  # the same series all along
        dp.close()  # pinned: keeps counting while no agent runs
        send(3)
    last = datapath(mode=chain[-1], cgroup_root=cgroup_root)  # the same mode again: adopted as it is
    settle()
    got = last.snapshot().flows[flow]
    assert (got.bytes, got.packets) == (sent * (UDP_V4 + 10), sent)
    assert got.first_seen_unix_ns == first_seen
