"""Where a node's datapath lives in bpffs, and how it is removed (`otel-kzt agent --cleanup`).

    <pin_root>/<dir>/<the mode's links>     e.g. link_v4, link_v6 (netfilter), running the dispatcher
    <pin_root>/<dir>/flows4, flows6, dying4, dying6, overflow, stats, progs, meta, slot4, slot6
                                            the maps (bcc's BPF_TABLE_PINNED); tc also tcdev, tcdev_more
                                            (its devices' flags, tc.py DeviceConfig)
    <pin_root>/<dir>/agent_state            the agent's own receiver choice (agent/state.py), kept
                                            through a datapath reset

`<dir>` is `pin_dir_name(node)`: bpffs refuses every name containing '.' (EPERM), and EKS names every
node with dots (ip-10-0-1-2.eu-west-1.compute.internal). Pins keep links and maps alive while no agent
runs, so a restart loses nothing.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Final

from otel_kzt.agent.datapath import bpfsys, flowmap, tc
from otel_kzt.agent.datapath.bpffs import BPFFS
from otel_kzt.errors import ConfigError, DatapathError, PrivilegeError

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT: Final = "/sys/fs/bpf/otel-kzt"  # the agent's --pin-root default (agent/config.py)
MAP_NAMES = ("flows4", "flows6", "dying4", "dying6", "overflow", "stats", "progs", "meta", "slot4", "slot6")
# A Kubernetes node name is a DNS subdomain: it is also a safe path component.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def pin_dir_name(node_name: str) -> str:
    """The bpffs directory name of a node: '.' -> '_'. A DNS subdomain never holds '_', so no two node
    names share a directory. The one mapping every pin user goes through (agent, cleanup, tests)."""
    if not _NODE_NAME.match(node_name) or ".." in node_name:
        raise ConfigError("node_name", f"{node_name!r} is not a valid Kubernetes node name")
    return node_name.replace(".", "_")


def node_dir(node_name: str, pin_root: str = DEFAULT_PIN_ROOT) -> Path:
    return Path(pin_root) / pin_dir_name(node_name)


def check_pin_root(pin_root: str) -> None:
    """bpffs refuses '.' in any name below its mount point: say so rather than "permission denied"."""
    path = Path(pin_root)
    if path.is_relative_to(BPFFS) and "." in str(path.relative_to(BPFFS)):
        raise ConfigError("pin_root", f"{pin_root!r}: bpffs refuses names containing '.'")


def make_node_dir(directory: Path) -> None:
    """Create a node's pin directory; a bpffs EPERM is a naming problem when the path holds a '.'."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        if "." in directory.name or "." in str(directory.parent).removeprefix(str(BPFFS)):
            raise DatapathError(f"cannot create {directory}: bpffs refuses names containing '.'") from exc
        raise PrivilegeError(
            f"cannot create {directory}: permission denied (bpffs is root-owned, mode 0700)"
        ) from exc


def _is_link(fd: int) -> bool:
    """Whether a pinned object is a BPF link (its fdinfo names a link_type), whatever mode made it."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
        return any(line.startswith("link_type:") for line in info)


def detach_pinned_links(directory: Path) -> int:
    """Detach every pinned link of a node, of any mode (the kernel drops the hook at once); returns
    how many."""
    detached = 0
    entries = sorted(directory.iterdir()) if directory.is_dir() else []
    for path in entries:
        detached += detach_link_pin(path)
    return detached


def detach_link_pin(path: Path) -> bool:
    """Detach the link pinned at `path`; False when nothing, or no link, is pinned there."""
    try:
        fd = bpfsys.obj_get(str(path))
    except FileNotFoundError:
        return False
    try:
        if _is_link(fd):
            bpfsys.link_detach(fd)
            return True
        return False
    finally:
        os.close(fd)


def unpin_all(directory: Path) -> None:
    """Remove every pin of a node and the node directory (maps go when their last user does)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()


def reset_if_incompatible(node_name: str, pin_root: str, map_size: int) -> None:
    """Remove a node's pins when its flow maps have another layout or size: old and new values cannot
    be mixed (a changed program with the same layout is replaced in place instead)."""
    directory = node_dir(node_name, pin_root)
    for layout in flowmap.LAYOUTS.values():
        for name, want in (
            (layout.map_name, (layout.key.size, layout.value.size, map_size)),
            (layout.slot_name, (4, layout.slot_size, 1)),
        ):
            try:
                fd = bpfsys.obj_get(str(directory / name))
            except FileNotFoundError:
                continue
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            got = (info.key_size, info.value_size, info.max_entries)
            if got == want:
                continue
            log.warning(
                "pinned %s (key, value, entries)=%s, want %s: resetting node=%s", name, got, want, node_name
            )
            cleanup(node_name, pin_root)
            return


def cleanup(node_name: str, pin_root: str = DEFAULT_PIN_ROOT) -> None:
    """Detach and unpin everything of one node: the uninstall path (`--cleanup`, demo and tests)."""
    directory = node_dir(node_name, pin_root)
    if not directory.exists():
        log.info("nothing pinned node=%s dir=%s", node_name, directory)
    else:
        detached = tc.detach_classic_pins(directory) + detach_pinned_links(directory)
        unpin_all(directory)
        log.info("datapath removed node=%s links_detached=%d dir=%s", node_name, detached, directory)
    remove_empty_root(pin_root)


def remove_empty_root(pin_root: str) -> None:
    """The pin root goes with its last node's pins (the agent made it for them): an uninstall leaves
    nothing in bpffs. Kept while another node's pins are in it; a mount point (bpffs itself) stays."""
    root = Path(os.path.abspath(pin_root))
    if root == BPFFS or not root.is_dir():
        return
    try:
        root.rmdir()
    except OSError as exc:  # ENOTEMPTY: other nodes' pins; EBUSY: a mount point
        log.debug("pin root kept root=%s reason=%s", root, exc.strerror)
