"""Whether a pin root is on the host's bpffs, decided from mountinfo (bpffs.problem); the kernel test
tests/kernel/test_agent_pins_host.py runs the real agent in real private mount namespaces."""

from __future__ import annotations

from otel_kzt.agent.datapath.bpffs import mount_of, needed_mount, parse_mountinfo, problem

HOST = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
45 23 0:40 / /sys/fs/bpf rw,relatime shared:12 - bpf bpf rw
"""
COPIED = """\
301 300 254:1 / / rw,relatime - ext4 /dev/vda1 rw
302 301 0:22 / /sys rw,relatime - sysfs sysfs rw
303 302 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
"""
NETNS_EXEC = """\
301 300 254:1 / / rw,relatime - ext4 /dev/vda1 rw
310 301 0:77 / /sys rw,relatime - sysfs kp-n rw
"""
OWN_BPFFS = NETNS_EXEC + "311 310 0:78 / /sys/fs/bpf rw,relatime - bpf bpf rw\n"
ROOT = "/sys/fs/bpf/otel-kzt"


def test_mountinfo_fields_and_escaped_spaces() -> None:
    mounts = parse_mountinfo(HOST + "50 27 0:50 / /mnt/with\\040space rw - tmpfs tmpfs rw\n")
    bpf = mounts[3]
    assert (bpf.mount_point, bpf.fs_type, bpf.device) == ("/sys/fs/bpf", "bpf", "0:40")
    assert mounts[-1].mount_point == "/mnt/with space"


def test_the_longest_mount_point_over_a_path_and_the_last_of_a_stack() -> None:
    mounts = parse_mountinfo(HOST)
    assert mount_of(ROOT, mounts).mount_point == "/sys/fs/bpf"  # type: ignore[union-attr]
    assert mount_of("/sys/fs/bpfx", mounts).mount_point == "/sys"  # type: ignore[union-attr]
    stacked = parse_mountinfo(HOST + "46 23 0:41 / /sys/fs/bpf rw - tmpfs tmpfs rw\n")
    assert mount_of(ROOT, stacked).fs_type == "tmpfs"  # type: ignore[union-attr]


def test_the_hosts_namespace_and_copies_of_it_pass() -> None:
    host = parse_mountinfo(HOST)
    assert problem(ROOT, host, True, host) is None
    assert problem(ROOT, parse_mountinfo(COPIED), False, host) is None  # same superblock 0:40


def test_no_bpffs_or_a_private_one_is_a_problem() -> None:
    host = parse_mountinfo(HOST)
    assert problem(ROOT, parse_mountinfo(NETNS_EXEC), False, host) == (
        "it is not on a bpffs in this mount namespace"
    )
    assert problem(ROOT, parse_mountinfo(OWN_BPFFS), False, host) == (
        "/sys/fs/bpf is a bpffs of this mount namespace only"
    )
    assert problem("/tmp/pins", host, True, host) == "it is not on a bpffs"


def test_a_container_that_cannot_see_the_host_needs_a_bpffs() -> None:
    assert problem(ROOT, parse_mountinfo(OWN_BPFFS), False, None) is None  # the hostPath mount
    assert problem(ROOT, parse_mountinfo(NETNS_EXEC), False, None) is not None


def test_the_mount_named_is_where_the_host_bpffs_goes() -> None:
    assert needed_mount(ROOT) == "/sys/fs/bpf"
    assert needed_mount("/run/pins") == "/run/pins"
