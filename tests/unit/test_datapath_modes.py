"""The modes by name and their options: configured tc/cgroup modes, the cgroup v2 root on unified and hybrid
hosts, tc's pin names (bpffs refuses dots), which pins belong to which mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from otel_kzt.agent.datapath import cgroup, modes, tc
from otel_kzt.errors import ConfigError

HYBRID = """cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n"


def mounts(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mounts"
    path.write_text(text)
    return str(path)


def test_default_cgroup_root_on_unified_hybrid_and_no_cgroup2(tmp_path: Path) -> None:
    assert cgroup.default_root(mounts(tmp_path, UNIFIED)) == "/sys/fs/cgroup"
    assert cgroup.default_root(mounts(tmp_path, HYBRID)) == "/sys/fs/cgroup/unified"
    assert cgroup.default_root(mounts(tmp_path, "cgroup2 /run/cilium/cgroupv2 cgroup2 rw 0 0\n")) == (
        "/run/cilium/cgroupv2"
    )
    assert cgroup.default_root(mounts(tmp_path, "proc /proc proc rw 0 0\n")) is None


def test_a_cgroup_root_must_be_on_cgroup2(tmp_path: Path) -> None:
    fake = mounts(tmp_path, f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    (tmp_path / "pods").mkdir()
    cgroup.check_root(str(tmp_path / "pods"), fake)  # below the mount: fine
    with pytest.raises(ConfigError, match=r"cgroup_root: .* no such directory"):
        cgroup.check_root(str(tmp_path / "gone"), fake)
    with pytest.raises(ConfigError, match="not on a cgroup v2 file system"):
        cgroup.check_root("/proc", fake)


def test_tc_pin_names_avoid_dots_and_map_back() -> None:
    for device in ("eth0", "vxlan.calico", "eth0.100"):
        name = tc.pin_name(device)
        assert "." not in name and name.startswith("tc_")
        assert tc.device_of_pin(name) == device


def test_each_mode_knows_its_own_pins() -> None:
    netfilter, tc_mode, cgroup_mode = (modes.by_name(n) for n in ("netfilter", "tc", "cgroup"))
    assert netfilter.owns_pin("link_v4") and not netfilter.owns_pin("tc_eth0")
    assert tc_mode.owns_pin("tc_eth0") and not tc_mode.owns_pin("cgroup_egress")
    assert cgroup_mode.owns_pin("cgroup_egress") and not cgroup_mode.owns_pin("link_v6")
    assert not any(m.owns_pin("flows4") or m.owns_pin("progs") for m in modes.MODES.values())


def test_create_configures_tc_and_cgroup_and_refuses_unknown_names() -> None:
    configured = modes.create("tc", tc_devices=("eth*",), cgroup_root="/ignored")
    assert isinstance(configured, tc.TcMode) and configured.patterns == ("eth*",)
    rooted = modes.create("cgroup", cgroup_root="/sys/fs/cgroup/unified/pods")
    assert isinstance(rooted, cgroup.CgroupMode) and rooted.root == "/sys/fs/cgroup/unified/pods"
    assert modes.create("netfilter") is modes.by_name("netfilter")
    with pytest.raises(ConfigError, match="datapath: unknown datapath 'ebpf'"):
        modes.create("ebpf")
