"""The node datapath: the kernel programs that count bytes and packets per flow, and their reading.

The rest of the agent reads flows through `otel_kzt.agent.flows` (`FlowKey`, `FlowCounters`, `Snapshot`,
`FlowReader`) and starts and stops the datapath through `Datapath`/`DatapathConfig`/`cleanup` here,
without knowing which mode counted the packets.

Module map (shared core, then one module per mode):
    core.py        `Datapath`: start (through the loader child), snapshot, evict, close
    loader.py      the short-lived child that runs bcc: compile, load, install the counter, attach, pin
                   (loadchild.py: its `python -m` entry point)
    probe.py       feature checks and compile flags (shared offsets from BTF); the C sources' paths
    btf.py         reader of the running kernel's BTF (struct offsets, enum values)
    bpfsys.py      raw bpf(2)/membarrier through ctypes, RCU grace periods; syscall numbers per architecture
    bpfmap.py      one map by fd (element lookup/update/delete, per-CPU sums)
    flowmap.py     the flow maps' binary layout (mirror of bpf/flow.h) and its decoding
    flowtables.py  batch reads of the flow maps and the lossless eviction protocol
    pins.py        where a node's pins live in bpffs, reset and cleanup
    netns_cookie.py  the namespace a pinned attachment belongs to
    mode.py        what a mode gives the core (`Mode`); modes.py: the modes by name
    netfilter.py   the `netfilter` mode: links at POSTROUTING (IPv4, IPv6)
    tc.py          the `tc` mode: the egress of the devices traffic leaves by (devices.py chooses them,
                   tclinks.py attaches: tcx links, else classic clsact filters; tcwatch.py follows the
                   devices while the agent runs)
    cgroup.py      the `cgroup` mode: socket egress of a cgroup v2 subtree
    modeswitch.py  a restart into another mode: what goes, what carries on
    auto.py        `--datapath auto|<mode>`: which mode starts, and why
    bpf/           package data: flow.h (map layout), count.h (the counting every mode shares),
                   netfilter.c (the netfilter mode's entry file), floor.c (the benchmark's floor),
                   skb.h (reading packets through __sk_buff), tc.c and cgroup.c (their modes' entries)
"""

from __future__ import annotations

from otel_kzt.agent.datapath.auto import printable, start_datapath
from otel_kzt.agent.datapath.core import Datapath, DatapathConfig, cleanup

__all__ = ["Datapath", "DatapathConfig", "cleanup", "printable", "start_datapath"]
