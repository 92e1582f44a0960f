"""First-seen times are stable: every read, every restart and every other process that adopts the pins
derives the bit-identical `first_seen_unix_ns` (the enricher takes a changed start time for a reset)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import Datapath
from tests.kernel.conftest import PIN_ROOT, DatapathFactory, Net, settle
from tests.kernel.test_datapath import UDP, key

pytestmark = pytest.mark.kernel

# Run by a second process in the node's namespace: adopts the pins, prints every flow's first-seen time.
_ADOPT = """
import json, sys
from otel_kzt.agent.datapath import Datapath, DatapathConfig
dp = Datapath(DatapathConfig(node_name=sys.argv[1], pin_root=sys.argv[2]))
dp.start()
try:
    flows = dp.snapshot().flows
    print(json.dumps({f"{k.src.hex()}>{k.dst.hex()}/{k.proto}/{k.dst_port}": c.first_seen_unix_ns
                      for k, c in flows.items()}))
finally:
    dp.close()
"""


def _first_seen_in_another_process(net: Net, dp: Datapath) -> dict[str, int]:
    argv = netns.ns_argv(net.node, [sys.executable, "-c", _ADOPT, dp.config.node_name, PIN_ROOT])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_first_seen_is_bit_identical_across_reads_restarts_and_processes(
    net: Net, datapath: DatapathFactory
) -> None:
    net.drop_udp_at(net.pod_b)
    first = datapath()
    net.traffic(net.pod_a, "udp", net.b4, 53, 3, 10)
    settle()
    k = key(net.a4, net.b4, UDP, dport=53)
    reads = [first.snapshot().flows[k].first_seen_unix_ns for _ in range(3)]
    net.traffic(net.pod_a, "udp", net.b4, 53, 3, 10)  # more packets: the start time must not move
    settle()
    reads.append(first.snapshot().flows[k].first_seen_unix_ns)
    assert len(set(reads)) == 1, reads
    first.close()

    second = datapath()  # a restart in this process adopts the pins
    assert second.snapshot().flows[k].first_seen_unix_ns == reads[0]
    second.close()

    other = _first_seen_in_another_process(net, second)
    assert other[f"{k.src.hex()}>{k.dst.hex()}/{UDP}/53"] == reads[0]


def test_a_fresh_datapath_records_its_own_offset(net: Net, datapath: DatapathFactory) -> None:
    """Without pins every datapath is fresh: still stable across its own reads."""
    net.drop_udp_at(net.pod_b)
    dp = datapath(pin=False)
    net.traffic(net.pod_a, "udp", net.b4, 53, 2, 10)
    settle()
    k = key(net.a4, net.b4, UDP, dport=53)
    times = {dp.snapshot().flows[k].first_seen_unix_ns for _ in range(5)}
    assert len(times) == 1
