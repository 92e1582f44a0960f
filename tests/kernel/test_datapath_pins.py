"""Pin directories on the real bpffs: dotted (EKS) node names pin and clean up, and bpffs's EPERM for a
name with a '.' is reported as a naming problem, not as missing privileges."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_kzt import netns
from otel_kzt.agent import netfilter, pins
from otel_kzt.agent.datapath import Datapath, DatapathConfig, cleanup
from otel_kzt.errors import DatapathError, PrivilegeError
from tests.kernel.conftest import PIN_ROOT, Net, settle
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
    pins.ensure_bpffs(PIN_ROOT)
    Path(PIN_ROOT).mkdir(exist_ok=True)
    with pytest.raises(DatapathError, match=r"refuses names containing '\.'") as err:
        pins.make_node_dir(Path(PIN_ROOT) / dotted)
    assert not isinstance(err.value, PrivilegeError)
    with pytest.raises(DatapathError, match=r"refuses names containing '\.'") as err:
        netfilter.obj_get(f"{PIN_ROOT}/{dotted}/meta")
    assert not isinstance(err.value, PrivilegeError)
