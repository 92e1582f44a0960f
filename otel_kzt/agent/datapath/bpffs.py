"""Whether the pin root is on the host's bpffs, so that pins really outlive the agent (DESIGN §5.4).

A bpffs mounted in a private mount namespace (a container without the hostPath mount, `ip netns exec`,
`unshare -m`) dies with that namespace: pinned there, a restart loses the traffic of the gap and every
series restarts. So with pinning on the agent refuses to start unless the pin root is on a bpffs the
host's mount namespace holds too, and it mounts one itself only in the host's mount namespace.

Which namespace is the host's: PID 1 of the initial PID namespace is the host's init, so the agent is in
the host's mount namespace when its PID namespace is the initial one (fixed inode PROC_PID_INIT_INO) and
its "/" is the very mount PID 1's is (a copied mount namespace gives every mount a new id). A bpffs is
the host's when the host's mountinfo lists a bpf mount of the same superblock (device number): a bind
mount or a copied namespace shares it, a new bpffs mount never does. In a container's own PID namespace
the host cannot be seen; there a bpffs can only be the hostPath mount (the agent never mounts one
outside the host's namespace), and its absence is refused.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from otel_kzt.errors import DatapathError

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
PROC_PID_INIT_INO = 0xEFFFFFFC  # include/linux/proc_ns.h: the initial PID namespace's inode
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    mount_id: int
    device: str  # "major:minor" of the superblock: shared by bind mounts and copied namespaces
    mount_point: str
    fs_type: str


def parse_mountinfo(text: str) -> list[Mount]:
    """proc(5) mountinfo: `id parent major:minor root mount-point options [optional...] - type ...`."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 7:
            continue
        fs_type = fields[fields.index("-") + 1]
        point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])  # "\040" is a space
        mounts.append(Mount(int(fields[0]), fields[2], point, fs_type))
    return mounts


def read_mountinfo(pid: str) -> list[Mount] | None:
    """The mounts `pid` sees ("self", "1"); None when its mountinfo cannot be read."""
    try:
        return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text(errors="replace"))
    except OSError:
        return None


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount `path` lies on: the longest mount point over it, the last one listed if stacked."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") + "/"
        if (path.rstrip("/") + "/").startswith(point) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return best


def _root_id(mounts: list[Mount]) -> int | None:
    return next((m.mount_id for m in reversed(mounts) if m.mount_point == "/"), None)


def host_mounts(own: list[Mount]) -> tuple[bool, list[Mount] | None]:
    """(whether this process is in the host's mount namespace, the host's mounts or None if unseen)."""
    if os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO:
        return False, None  # a container's PID namespace: its PID 1 is not the host's init
    host = read_mountinfo("1")
    if host is None:
        return False, None
    return _root_id(host) == _root_id(own), host


def needed_mount(pin_root: str) -> str:
    """Where the host's bpffs must be mounted for this pin root."""
    return str(BPFFS) if Path(pin_root).is_relative_to(BPFFS) else pin_root


def problem(path: str, own: list[Mount], in_host: bool, host: list[Mount] | None) -> str | None:
    """Why pins under `path` would not outlive the agent, or None when they would."""
    mount = mount_of(path, own)
    if mount is None or mount.fs_type != "bpf":
        return "it is not on a bpffs" + ("" if in_host else " in this mount namespace")
    if in_host or host is None:
        return None  # the host's own namespace, or a container (a bpffs there is the hostPath mount)
    if any(m.fs_type == "bpf" and m.device == mount.device for m in host):
        return None  # the host's bpffs, seen through a bind mount or a copied mount namespace
    return f"{mount.mount_point} is a bpffs of this mount namespace only"


def require_host_bpffs(pin_root: str) -> None:
    """Refuse pins that would not outlive the agent; mount bpffs on /sys/fs/bpf in the host's mount
    namespace when nothing is mounted there (as on a plain Debian VM)."""
    path = os.path.abspath(pin_root)
    own = read_mountinfo("self") or []
    in_host, host = host_mounts(own)
    why = problem(path, own, in_host, host)
    if why is not None and in_host and Path(path).is_relative_to(BPFFS):
        _mount_bpffs()
        why = problem(path, read_mountinfo("self") or [], in_host, host)
    if why is not None:
        raise DatapathError(
            f"pins under {pin_root} would die with this agent ({why}): it needs the host's bpffs mounted "
            f"on {needed_mount(pin_root)} (in a container: a hostPath volume of /sys/fs/bpf), "
            "or run with --no-pin"
        )


def _mount_bpffs() -> None:
    log.info("mounting bpffs in the host's mount namespace path=%s", BPFFS)
    proc = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise DatapathError(f"cannot mount bpffs on {BPFFS}: {proc.stderr.strip()}")
