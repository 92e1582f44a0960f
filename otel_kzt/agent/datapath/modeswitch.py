"""A restart that changes `--datapath`: the flow maps (and so every series and start time) carry on, the
attachments change.

The pinned program array `progs` belongs to the program type that first used it (the kernel refuses a
tail call across types), so before the new mode's programs are loaded the array is unpinned when it holds
another type's counter; the old dispatcher keeps its own reference and counts until its attachment goes.
After the new mode is attached, the other modes' pins (links, classic filters) are detached and removed:
for a moment both count, never neither, which is why the switch is exact for the traffic both modes see
only given a quiet moment at the switch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from otel_kzt.agent.datapath import bpfsys, pins, tc, tclinks
from otel_kzt.agent.datapath.bpfmap import BpfMap, u32
from otel_kzt.agent.datapath.bpfsys import BpfCallError
from otel_kzt.agent.datapath.mode import Mode

log = logging.getLogger(__name__)

PROGS = "progs"


def counter_type(directory: Path) -> int | None:
    """The program type of the counter in the pinned `progs`, None when none is pinned or installed."""
    try:
        fd = bpfsys.obj_get(str(directory / PROGS))
    except FileNotFoundError:
        return None
    progs = BpfMap(fd, PROGS)
    try:
        raw = progs.lookup(u32(0))
    finally:
        progs.close()
    if raw is None:
        return None
    try:
        prog_fd = bpfsys.prog_fd_by_id(int.from_bytes(raw[:4], "little"))
    except BpfCallError:
        return None  # gone in between
    try:
        return bpfsys.prog_info(prog_fd).prog_type
    finally:
        os.close(prog_fd)


def prepare(directory: Path, mode: Mode) -> bool:
    """Before loading `mode`: unpin a `progs` of another program type. True when the mode changes."""
    owner = counter_type(directory)
    others = [name for name in attachment_pins(directory) if not mode.owns_pin(name)]
    if owner is None or owner == mode.prog_type:
        if others:
            log.info(
                "datapath mode changes to %s: other attachments %s go once it is attached", mode.name, others
            )
        return bool(others)
    log.info("datapath mode changes to %s: unpinning the program array of program type %d", mode.name, owner)
    (directory / PROGS).unlink()
    return True


def attachment_pins(directory: Path, modes: Iterable[Mode] | None = None) -> list[str]:
    """Names of the pins in `directory` that stand for an attachment of some mode."""
    from otel_kzt.agent.datapath.modes import MODES

    known = list(modes) if modes is not None else list(MODES.values())
    entries = sorted(directory.iterdir()) if directory.is_dir() else []
    return [e.name for e in entries if any(m.owns_pin(e.name) for m in known)]


def detach_others(directory: Path, mode: Mode) -> int:
    """After `mode` is attached: detach and unpin every other mode's attachment; returns how many."""
    removed = 0
    for name in attachment_pins(directory):
        if mode.owns_pin(name):
            continue
        path = directory / name
        if name.startswith(tc.PIN_PREFIX):
            tclinks.detach_pinned(str(path), tc.device_of_pin(name))
        else:
            pins.detach_link_pin(path)
        path.unlink()
        removed += 1
        log.info("previous mode's attachment detached pin=%s", name)
    return removed
