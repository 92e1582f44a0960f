"""The datapath's life on the real kernel: a full map, ephemeral ports, eviction under traffic, restarts
(unchanged and changed program), --no-pin and --cleanup. The full map, the eviction and the restarts run
in every mode (`MODES`)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time

import pytest

from otel_kzt import netns
from otel_kzt.agent.datapath import Datapath, bpfsys, cleanup, flowmap, modes, tc
from otel_kzt.agent.datapath.netfilter import LINK_PRIORITY
from otel_kzt.agent.flows import ORIGIN_LOCAL, FlowCounters, FlowKey
from tests.kernel.conftest import MODES, NODE_DEVICES, PIN_ROOT, DatapathFactory, Net, settle
from tests.kernel.test_datapath import TCP, UDP, key
from tests.support.seccomp import refuse_in_this_thread

pytestmark = pytest.mark.kernel

UDP_V4_OVERHEAD = 20 + 8


def udp_totals(flows: dict[FlowKey, FlowCounters]) -> tuple[int, int]:
    udp = [c for k, c in flows.items() if k.proto == UDP]
    return sum(c.bytes for c in udp), sum(c.packets for c in udp)


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_full_map_overflow_keeps_total_exact(net: Net, datapath: DatapathFactory) -> None:
    net.drop_udp_at(net.pod_b)
    net.quiet_ipv6()
    dp = datapath(map_size=16)
    net.traffic(net.pod_a, "udp-ports", net.b4, 1000, 100, 50)  # 100 flows, 16 slots
    settle()
    snap = dp.snapshot()
    in_map = {k: c for k, c in snap.flows.items() if k.proto == UDP}
    assert len(snap.flows) == 16
    assert len(in_map) == 16 and all(c.packets == 1 for c in in_map.values())
    other_bytes = sum(c.bytes for k, c in snap.flows.items() if k.proto != UDP)
    other_packets = sum(c.packets for k, c in snap.flows.items() if k.proto != UDP)
    assert other_packets == 0, "only the UDP sent here may pass the node"
    total_bytes = udp_totals(snap.flows)[0] + snap.overflow_bytes + other_bytes
    assert total_bytes == 100 * (UDP_V4_OVERHEAD + 50)
    assert len(in_map) + snap.overflow_packets == 100
    assert snap.insert_failures == snap.overflow_packets == 84
    assert snap.capacity == 16


def test_ephemeral_client_ports_make_one_flow(
    net: Net, datapath: DatapathFactory, topo: netns.Topology
) -> None:
    net.serve_tcp(topo, net.pod_b, 8443)
    dp = datapath()
    result = net.traffic(net.pod_a, "tcp-connects", net.b4, 8443, 10_000, timeout=170)
    assert result["distinct_client_ports"] > 5_000
    settle()
    tcp = {k: c for k, c in dp.snapshot().flows.items() if k.proto == TCP}
    assert set(tcp) == {key(net.a4, net.b4, TCP, dport=8443), key(net.b4, net.a4, TCP, sport=8443)}
    # SYN, ACK, RST at least per connection from the client; SYN-ACK from the server.
    assert tcp[key(net.a4, net.b4, TCP, dport=8443)].packets >= 30_000
    assert tcp[key(net.b4, net.a4, TCP, sport=8443)].packets >= 10_000


def evict_while_traffic_runs(dp: Datapath, until: float) -> tuple[int, int, int, int]:
    """Snapshot and evict every UDP flow, again and again: (bytes, packets) evicted, rounds, removed."""
    evicted_bytes = evicted_packets = rounds = removed = 0
    while time.monotonic() < until:
        snap = dp.snapshot()
        evicted_bytes, evicted_packets = (
            evicted_bytes + udp_totals(snap.evicted)[0],
            evicted_packets + udp_totals(snap.evicted)[1],
        )
        removed += dp.evict([k for k in snap.flows if k.proto == UDP])
        rounds += 1
    return evicted_bytes, evicted_packets, rounds, removed


def with_membarrier_refused(dp: Datapath, until: float) -> tuple[int, int, int, int]:
    """The same loop in a thread to which the kernel refuses membarrier (seccomp: EINVAL, what the
    kernel answers under nohz_full): the eviction's grace periods come from the fallback."""
    result: list[tuple[int, int, int, int]] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            refuse_in_this_thread(bpfsys.sys_membarrier(), errno.EINVAL)
            assert bpfsys.membarrier_global() == errno.EINVAL
            result.append(evict_while_traffic_runs(dp, until))
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="membarrier-refused")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return result[0]


@pytest.mark.parametrize("grace", ["membarrier", "membarrier-refused"])
@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_eviction_while_traffic_runs_loses_nothing(
    net: Net, datapath: DatapathFactory, topo: netns.Topology, grace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    periods = bpfsys.GracePeriods()  # this test's own: whether membarrier was refused is not kept
    monkeypatch.setattr(bpfsys, "grace_periods", periods)
    net.drop_udp_at(net.pod_b)
    net.quiet_ipv6()
    dp = datapath()
    done = net.background(topo, net.pod_a, "udp-stream", net.b4, 2000, 2.0, 64, 20)
    loop = with_membarrier_refused if grace == "membarrier-refused" else evict_while_traffic_runs
    evicted_bytes, evicted_packets, rounds, removed = loop(dp, time.monotonic() + 2.5)
    sent = done()["sent"]
    settle()
    last = dp.snapshot()
    live_bytes, live_packets = udp_totals(last.flows)
    final_evicted = udp_totals(last.evicted)
    total_packets = live_packets + evicted_packets + final_evicted[1] + last.overflow_packets
    total_bytes = live_bytes + evicted_bytes + final_evicted[0] + last.overflow_bytes
    logging.getLogger(__name__).info(
        "eviction test grace=%s sent=%d rounds=%d removed=%d races=%d slot_updates=%d",
        grace, sent, rounds, removed, last.eviction_races, periods.by_slot_update,
    )  # fmt: skip
    assert removed > 20, "evictions must really have happened during the traffic"
    assert total_packets == sent
    assert total_bytes == sent * (UDP_V4_OVERHEAD + 64)
    # Racing packets were kept with their flow (in its final value), not in the overflow bucket.
    assert last.eviction_races > 0 and last.overflow_packets == 0
    if grace == "membarrier-refused":  # every eviction waited twice, through the map-in-map
        assert periods.membarrier_errno == errno.EINVAL and periods.by_slot_update >= 2 * rounds
    else:
        assert periods.membarrier_errno == 0 and periods.by_slot_update == 0


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_restart_unchanged_misses_nothing_and_keeps_first_seen(
    net: Net, datapath: DatapathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    net.drop_udp_at(net.pod_b)
    first = datapath()
    net.traffic(net.pod_a, "udp", net.b4, 53, 5, 10)
    settle()
    k = key(net.a4, net.b4, UDP, dport=53)
    before = first.snapshot().flows[k]
    first.close()  # pinned: the program keeps counting with no agent running
    net.traffic(net.pod_a, "udp", net.b4, 53, 7, 10)
    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    second = datapath()
    assert "flow counter adopted unchanged" in caplog.text
    settle()
    after = second.snapshot().flows[k]
    assert (after.packets, after.bytes) == (12, 12 * (UDP_V4_OVERHEAD + 10))
    assert after.first_seen_unix_ns == pytest.approx(before.first_seen_unix_ns, abs=5_000_000)
    assert after.first_seen_unix_ns < time.time_ns()


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_changed_program_replaces_old_without_gap_or_double_count(
    net: Net, datapath: DatapathFactory, topo: netns.Topology, caplog: pytest.LogCaptureFixture
) -> None:
    net.drop_udp_at(net.pod_b)
    first = datapath()
    done = net.background(topo, net.pod_a, "udp-stream", net.b4, 3000, 2.5, 32, 4)
    time.sleep(0.5)
    first.close()
    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    second = datapath(ephemeral_max=64999)  # other flags: another source hash, same map layout
    assert "flow counter installed" in caplog.text
    assert "link adopted" in caplog.text
    sent = done()["sent"]
    settle()
    snap = second.snapshot()
    assert udp_totals(snap.flows) == (sent * (UDP_V4_OVERHEAD + 32), sent)
    assert snap.overflow_packets == 0


def _link_ids(dp: Datapath) -> list[int]:
    return [bpfsys.link_info(fd).link_id for fd in dp.link_fds]


def _link_exists(link_id: int) -> bool:
    proc = subprocess.run(["bpftool", "link", "show", "id", str(link_id)], capture_output=True, check=False)
    return proc.returncode == 0


LINKS = {"netfilter": 2, "tc": len(NODE_DEVICES), "cgroup": 1}  # IPv4 + IPv6 hooks; devices; the root
MAP_PINS = ["dying4", "dying6", "flows4", "flows6", "meta", "overflow", "progs", "slot4", "slot6", "stats"]
MODE_MAP_PINS = {"tc": tc.DEV_MAPS}  # tc's devices' flags


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_no_pin_detaches_on_close(net: Net, datapath: DatapathFactory, mode: str) -> None:
    dp = datapath(pin=False)
    ids = _link_ids(dp)
    assert len(ids) == LINKS[mode] and all(_link_exists(i) for i in ids)
    assert not os.path.exists(os.path.join(PIN_ROOT, dp.config.node_name))
    dp.close()
    dp.close()  # safe twice
    assert not any(_link_exists(i) for i in ids)


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_cleanup_detaches_and_unpins(net: Net, datapath: DatapathFactory, mode: str) -> None:
    dp = datapath()
    ids = _link_ids(dp)
    assert len(ids) == LINKS[mode]
    directory = os.path.join(PIN_ROOT, dp.config.node_name)
    maps = {*MAP_PINS, *MODE_MAP_PINS.get(mode, ())}
    attachments = sorted(set(os.listdir(directory)) - maps)
    assert maps <= set(os.listdir(directory))
    assert len(attachments) == LINKS[mode] and all(modes.MODES[mode].owns_pin(n) for n in attachments)
    if mode == "netfilter":
        assert attachments == ["link_v4", "link_v6"]
    dp.close()
    assert all(_link_exists(i) for i in ids), "pinned links outlive the agent"
    cleanup(dp.config.node_name, PIN_ROOT)
    assert not os.path.exists(directory)
    assert not any(_link_exists(i) for i in ids)
    cleanup(dp.config.node_name, PIN_ROOT)  # nothing left: still fine


def test_bpf_source_shows_flags_and_program(net: Net, datapath: DatapathFactory) -> None:
    dp = datapath(map_size=128)
    source = dp.bpf_source()
    assert "-DKZT_MAP_SIZE=128" in source and "-DKZT_OFF_SKB_HEAD=" in source
    assert "int kzt_count(" in source and "struct flow_key4 {" in source


def test_new_dispatcher_replaces_pinned_links(
    net: Net, datapath: DatapathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    net.drop_udp_at(net.pod_b)
    first = datapath()
    old_ids = _link_ids(first)
    net.traffic(net.pod_a, "udp", net.b4, 53, 3, 10)
    first.close()
    meta = os.path.join(PIN_ROOT, first.config.node_name, "meta")
    # Pretend the pinned dispatcher is of another version (key 1 = META_DISPATCH_VERSION).
    subprocess.run(
        ["bpftool", "map", "update", "pinned", meta, "key", "1", "0", "0", "0", "value", *["0"] * 8],
        check=True,
        capture_output=True,
    )
    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    second = datapath()
    assert "flow counter adopted unchanged" in caplog.text
    new_ids = _link_ids(second)
    assert set(new_ids).isdisjoint(old_ids) and not any(_link_exists(i) for i in old_ids)
    assert {bpfsys.link_info(fd).priority for fd in second.link_fds} == {LINK_PRIORITY + 1}
    net.traffic(net.pod_a, "udp", net.b4, 53, 4, 10)
    settle()
    assert second.snapshot().flows[key(net.a4, net.b4, UDP, dport=53)].packets == 7


def test_pins_of_another_namespace_are_replaced_not_adopted(net: Net, datapath: DatapathFactory) -> None:
    net.drop_udp_at(net.pod_b)
    first = datapath()
    old_ids = _link_ids(first)
    first.close()
    # Same node name, another namespace (as after a crash that re-created the node's namespace): links
    # there would count nothing here, so they are replaced.
    second = datapath(ns=net.pod_a)
    assert set(_link_ids(second)).isdisjoint(old_ids)
    assert not any(_link_exists(i) for i in old_ids)
    net.traffic(net.pod_a, "udp", net.b4, 53, 3, 10)
    settle()
    # The datapath is in pod A's namespace now: its packets are that namespace's own.
    assert second.snapshot().flows[key(net.a4, net.b4, UDP, dport=53, origin=ORIGIN_LOCAL)].packets == 3


def test_eviction_interrupted_by_a_crash_is_finished_by_the_next_agent(
    net: Net, datapath: DatapathFactory
) -> None:
    net.drop_udp_at(net.pod_b)
    first = datapath()
    net.traffic(net.pod_a, "udp", net.b4, 53, 4, 10)
    settle()
    k = key(net.a4, net.b4, UDP, dport=53)
    assert first._tables is not None
    assert first._tables.mark_dead(flowmap.V4, [k]) == 1
    first.close()  # "crash": marked dead, never collected
    net.traffic(net.pod_a, "udp", net.b4, 53, 3, 10)  # these race with the eviction: its dying entry
    second = datapath()
    snap = second.snapshot()
    assert k not in snap.flows
    assert (snap.evicted[k].packets, snap.evicted[k].bytes) == (7, 7 * (UDP_V4_OVERHEAD + 10))
    assert snap.overflow_packets == 0
