"""Starting the datapath the agent was asked for: a mode by name, or `auto` (DESIGN §3a).

`auto` takes `netfilter` where it can attach, else `tc`, and logs which and why the other was not taken;
`cgroup` is never picked by itself (it counts at the source sockets, a different view of the node's
traffic): the blind-datapath check tells the user when to choose it. A mode that cannot run raises one
`DatapathError` whose text names what is missing; the command prints it as one line and exits 1.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from otel_kzt.agent.datapath import probe
from otel_kzt.agent.datapath.core import Datapath, DatapathConfig
from otel_kzt.errors import KernelUnsupported, ProgramLoadError

log = logging.getLogger(__name__)

AUTO = "auto"
AUTO_ORDER = ("netfilter", "tc")
# What makes `auto` try the next mode; anything else (not root, no bcc) would stop every mode alike.
_NEXT_MODE = (KernelUnsupported, ProgramLoadError)


def start_datapath(config: DatapathConfig, requested: str) -> Datapath:
    """A started datapath in the `requested` mode (or the one `auto` finds)."""
    if requested != AUTO:
        return _started(replace(config, mode=requested))
    reasons: list[str] = []
    for name in AUTO_ORDER:
        try:
            datapath = _started(replace(config, mode=name))
        except _NEXT_MODE as exc:
            reasons.append(f"{name}: {exc}")
            log.warning("datapath auto: %s cannot run here: %s", name, exc)
            continue
        why = "; ".join(reasons) if reasons else f"{name} attaches here"
        log.info("datapath auto: using %s (%s)", name, why)
        return datapath
    raise KernelUnsupported("no datapath can run here: " + "; ".join(reasons))


def printable(config: DatapathConfig, requested: str) -> Datapath:
    """For `--print-bpf`: the datapath `start_datapath` would start first (by the kernel's BTF only)."""
    if requested != AUTO:
        return Datapath(replace(config, mode=requested))
    for name in AUTO_ORDER:
        datapath = Datapath(replace(config, mode=name))
        try:
            probe.probe(datapath.mode)
        except KernelUnsupported:
            continue
        return datapath
    return Datapath(replace(config, mode=AUTO_ORDER[-1]))


def _started(config: DatapathConfig) -> Datapath:
    datapath = Datapath(config)
    datapath.start()  # undoes a half-finished start itself
    return datapath
