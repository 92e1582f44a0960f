"""Pin directories on the real bpffs: dotted (EKS) node names pin and clean up, bpffs's EPERM for a name
with a '.' is reported as a naming problem, not as missing privileges, and pinned maps of another size
are reset rather than adopted."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_kzt import netns
from otel_kzt.agent import state
from otel_kzt.agent.datapath import Datapath, DatapathConfig, bpffs, bpfsys, cleanup, pins
from otel_kzt.errors import DatapathError, PrivilegeError
from tests.kernel.conftest import PIN_ROOT, DatapathFactory, Net, settle
from tests.kernel.test_datapath import UDP, key

pytestmark = pytest.mark.kernel

DOTTED = "kd-ip-10-0-1-2.eu-west-1.compute.internal"


@pytest.fixture
def dotted() -> Iterator[str]:
    cleanup(DOTTED, PIN_ROOT)  # a killed run's leftovers
    try:
        yield DOTTED
    finally:
        cleanup(DOTTED, PIN_ROOT)


def test_dotted_node_name_pins_counts_restarts_and_cleans_up(net: Net, dotted: str) -> None:
    net.drop_udp_at(net.pod_b)
    directory = Path(PIN_ROOT) / "kd-ip-10-0-1-2_eu-west-1_compute_internal"
    assert pins.node_dir(dotted, PIN_ROOT) == directory
    for attempt in range(2):  # the second start adopts what the first one pinned
        dp = Datapath(DatapathConfig(node_name=dotted, pin_root=PIN_ROOT))
        try:
            with netns.entered(net.node):
                dp.start()
            net.traffic(net.pod_a, "udp", net.b4, 53, 2, 10)
            settle()
            assert dp.snapshot().flows[key(net.a4, net.b4, UDP, dport=53)].packets == 2 * (attempt + 1)
        finally:
            dp.close()
        assert {"link_v4", "link_v6", "flows4", "meta"} <= {p.name for p in directory.iterdir()}
    cleanup(dotted, PIN_ROOT)
    assert not directory.exists()


def test_bpffs_eperm_for_a_dot_is_a_naming_error_not_a_privilege_error(dotted: str) -> None:
    bpffs.require_host_bpffs(PIN_ROOT)
    Path(PIN_ROOT).mkdir(exist_ok=True)
    with pytest.raises(DatapathError, match=r"refuses names containing '\.'") as err:
        pins.make_node_dir(Path(PIN_ROOT) / dotted)
    assert not isinstance(err.value, PrivilegeError)
    with pytest.raises(DatapathError, match=r"refuses names containing '\.'") as err:
        bpfsys.obj_get(f"{PIN_ROOT}/{dotted}/meta")
    assert not isinstance(err.value, PrivilegeError)


def test_cleanup_of_the_last_node_removes_the_pin_root() -> None:
    """An uninstall leaves nothing in bpffs: the pin root goes with the last node's pins, not before."""
    root = f"/sys/fs/bpf/kd-root-{os.getpid()}"
    bpffs.require_host_bpffs(root)
    nodes = ("kd-root-a", "kd-root-b")
    try:
        for node in nodes:
            store = state.open_node_store(node, root)  # a real pin in each node's directory
            assert store is not None
            store.close()
        cleanup(nodes[0], root)
        assert sorted(p.name for p in Path(root).iterdir()) == [nodes[1]]  # the other node's pins stay
        cleanup(nodes[1], root)
        assert not Path(root).exists()
        cleanup(nodes[1], root)  # again: nothing to do, no error
    finally:
        for node in nodes:
            cleanup(node, root)


def test_changed_map_size_resets_the_node(
    net: Net, datapath: DatapathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    net.drop_udp_at(net.pod_b)
    first = datapath(map_size=64)
    net.traffic(net.pod_a, "udp", net.b4, 53, 2, 10)
    settle()
    k = key(net.a4, net.b4, UDP, dport=53)
    assert first.snapshot().flows[k].packets == 2
    first.close()
    caplog.set_level(logging.INFO, logger="otel_kzt.agent")
    second = datapath(map_size=128)  # old and new values cannot be mixed: start over
    assert "resetting node=" in caplog.text
    fd = bpfsys.obj_get(str(pins.node_dir(second.config.node_name, PIN_ROOT) / "flows4"))
    try:
        assert bpfsys.map_info(fd).max_entries == 128
    finally:
        os.close(fd)
    net.traffic(net.pod_a, "udp", net.b4, 53, 3, 10)
    settle()
    snap = second.snapshot()
    assert snap.capacity == 128 and snap.flows[k].packets == 3
