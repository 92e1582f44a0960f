"""The datapath modes by name (`--datapath`): each implements `mode.Mode` over the shared core.

`netfilter` needs no options; `tc` takes the `--tc-devices` patterns, `cgroup` the `--cgroup-root`:
`create` builds a configured one, `MODES` holds unconfigured ones for names, pins and checks.
"""

from __future__ import annotations

from collections.abc import Sequence

from otel_kzt.agent.datapath import cgroup, netfilter, tc
from otel_kzt.agent.datapath.mode import Mode
from otel_kzt.errors import ConfigError

MODES: dict[str, Mode] = {
    netfilter.MODE.name: netfilter.MODE,
    tc.TcMode.name: tc.TcMode(),
    cgroup.CgroupMode.name: cgroup.CgroupMode(),
}


def by_name(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError("datapath", f"unknown datapath {name!r} (one of {', '.join(MODES)})") from None


def create(name: str, *, tc_devices: Sequence[str] = (), cgroup_root: str | None = None) -> Mode:
    """The mode `name` with its options (the ones of other modes are ignored)."""
    if name == tc.TcMode.name:
        return tc.TcMode(tc_devices)
    if name == cgroup.CgroupMode.name:
        return cgroup.CgroupMode(cgroup_root)
    return by_name(name)
