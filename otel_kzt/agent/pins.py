"""Where a node's datapath lives in bpffs, and how it is removed (`otel-kzt agent --cleanup`).

    <pin_root>/<node>/link_v4, link_v6      the netfilter links (running the dispatcher)
    <pin_root>/<node>/flows4, flows6, dying4, dying6, overflow, stats, progs, meta   the maps (bcc's
                                                           BPF_TABLE_PINNED)

Pins keep links and maps alive while no agent runs, so a restart loses nothing.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from otel_kzt.agent import netfilter
from otel_kzt.errors import ConfigError, DatapathError

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
DEFAULT_PIN_ROOT = "/sys/fs/bpf/otel-kzt"
LINK_NAMES = {netfilter.NFPROTO_IPV4: "link_v4", netfilter.NFPROTO_IPV6: "link_v6"}
MAP_NAMES = ("flows4", "flows6", "dying4", "dying6", "overflow", "stats", "progs", "meta")
# A Kubernetes node name is a DNS subdomain: it is also a safe path component.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def node_dir(node_name: str, pin_root: str = DEFAULT_PIN_ROOT) -> Path:
    if not _NODE_NAME.match(node_name) or ".." in node_name:
        raise ConfigError("node_name", f"{node_name!r} is not a valid Kubernetes node name")
    return Path(pin_root) / node_name


def _is_bpffs(path: Path) -> bool:
    # statfs magic of bpffs is BPF_FS_MAGIC 0xcafe4a11; /proc/self/mounts is simpler to read.
    with open("/proc/self/mounts", encoding="ascii", errors="replace") as mounts:
        return any(line.split()[1:3] == [str(path), "bpf"] for line in mounts if len(line.split()) > 2)


def ensure_bpffs(pin_root: str) -> None:
    """Mount bpffs on /sys/fs/bpf when nothing is mounted there (as on this Debian VM)."""
    if not pin_root.startswith(str(BPFFS)) or _is_bpffs(BPFFS):
        return
    log.info("mounting bpffs path=%s", BPFFS)
    proc = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise DatapathError(f"cannot mount bpffs on {BPFFS}: {proc.stderr.strip()}")


def detach_pinned_links(directory: Path) -> int:
    """Detach every pinned link of a node (the kernel drops the hook at once); returns how many."""
    detached = 0
    for name in LINK_NAMES.values():
        path = directory / name
        try:
            fd = netfilter.obj_get(str(path))
        except FileNotFoundError:
            continue
        try:
            netfilter.link_detach(fd)
            detached += 1
        finally:
            os.close(fd)
    return detached


def unpin_all(directory: Path) -> None:
    """Remove every pin of a node and the node directory (maps go when their last user does)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()


def cleanup(node_name: str, pin_root: str = DEFAULT_PIN_ROOT) -> None:
    """Detach and unpin everything of one node: the uninstall path (`--cleanup`, demo and tests)."""
    directory = node_dir(node_name, pin_root)
    if not directory.exists():
        log.info("nothing pinned node=%s dir=%s", node_name, directory)
        return
    detached = detach_pinned_links(directory)
    unpin_all(directory)
    log.info("datapath removed node=%s links_detached=%d dir=%s", node_name, detached, directory)
