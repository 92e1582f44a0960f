"""The `tc` mode's path for kernels without tcx links (before 6.6: EKS AL2023 and Bottlerocket on 6.1,
Ubuntu 22.04 on 5.15), run here by forcing it (`OTEL_KZT_TC_CLASSIC=1`): a classic cls_bpf filter on each
hooked device's clsact qdisc, its program pinned (a classic filter is no link).

Counts exactly, reads as attached (no link fd holds a classic filter), is adopted unchanged by the next
process (counters carry on), and is removed from the devices by `cleanup`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import cleanup, tc, tclinks
from tests.kernel.conftest import NODE_DEVICES, PIN_ROOT, DatapathFactory, Net, settle
from tests.kernel.test_datapath import UDP, key

pytestmark = [pytest.mark.kernel, pytest.mark.parametrize("mode", ["tc"], indirect=True)]


@pytest.fixture(autouse=True)
def classic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(tc.CLASSIC_ENV, "1")
    yield


def _our_filters(net: Net) -> list[str]:
    """Devices of the node with our classic filter (by its handle) on egress."""
    found = []
    for device in NODE_DEVICES:
        out = netns.run_in(net.node, ["tc", "-j", "filter", "show", "dev", device, "egress"]).stdout
        for entry in json.loads(out or "[]"):
            handle = (entry.get("options") or {}).get("handle")
            if isinstance(handle, str) and int(handle, 16) == tclinks.CLASSIC_HANDLE:
                found.append(device)
    return sorted(set(found))


def test_classic_filters_count_exactly_are_adopted_and_cleaned_up(
    net: Net, datapath: DatapathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    net.drop_udp_at(net.pod_b)
    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    first = datapath()
    assert "(classic clsact filter)" in caplog.text
    assert first.attached  # no link fd, still attached
    assert _our_filters(net) == sorted(NODE_DEVICES)
    flow = key(net.a4, net.b4, UDP, dport=53)
    net.traffic(net.pod_a, "udp", net.b4, 53, 5, 100)
    settle()
    got = first.snapshot().flows[flow]
    assert (got.bytes, got.packets) == (5 * 128, 5)
    first.close()  # pinned: the filters stay and count
    net.traffic(net.pod_a, "udp", net.b4, 53, 4, 100)
    caplog.clear()
    second = datapath()
    assert "tc filter adopted" in caplog.text and second.attached
    net.traffic(net.pod_a, "udp", net.b4, 53, 3, 100)
    settle()
    got = second.snapshot().flows[flow]
    assert (got.bytes, got.packets) == (12 * 128, 12)  # no gap, no double count
    assert _our_filters(net) == sorted(NODE_DEVICES)  # still one filter of ours per device
    second.close()
    with netns.entered(net.node):  # as `agent --cleanup` runs: in the node's namespace (tc finds the filters)
        cleanup(second.config.node_name, PIN_ROOT)
    assert _our_filters(net) == []
