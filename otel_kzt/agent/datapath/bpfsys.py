"""The `bpf(2)` calls bcc 0.26 does not make for us (links, pinning, test runs, object info, batch reads),
and the syscall numbers of the architectures the agent runs on.

This module is the one place that speaks raw `bpf(2)` through ctypes, for every mode; every failure is
translated into the exception tree of `otel_kzt.errors`. Mode-specific attach calls live in the mode's
module (`netfilter.py`) and go through `bpf()` here.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from otel_kzt.errors import DatapathError, KernelUnsupported, PrivilegeError

log = logging.getLogger(__name__)

# (bpf, membarrier) by machine: asm/unistd_64.h (x86_64), asm-generic/unistd.h (arm64).
SYSCALLS = {"x86_64": (321, 324), "aarch64": (280, 283), "arm64": (280, 283)}
MEMBARRIER_CMD_GLOBAL = 1

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12

BPF_MAP_CREATE = 0
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_DETACH = 34

ATTR_SIZE = 144  # large enough for every command used here
ENOTSUPP = 524  # the kernel-internal "not supported" that bpf(2) leaks to userspace
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall_numbers(machine: str) -> tuple[int, int]:
    numbers = SYSCALLS.get(machine)
    if numbers is None:
        raise KernelUnsupported(
            f"the datapath knows the bpf(2) syscall numbers of x86_64 and arm64 only, not {machine!r}"
        )
    return numbers


def sys_bpf() -> int:
    return _syscall_numbers(os.uname().machine)[0]


def sys_membarrier() -> int:
    return _syscall_numbers(os.uname().machine)[1]


class BpfCallError(DatapathError):
    """A bpf(2) command failed; `errno` says why."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {os.strerror(err)} (errno {err})")
        self.errno = err


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str, path: str | None = None) -> int:
    result = int(_libc.syscall(sys_bpf(), cmd, attr, ctypes.sizeof(attr)))
    if result < 0:
        err = ctypes.get_errno()
        if err == errno.EPERM and path is not None and "." in path.removeprefix("/sys/fs/bpf"):
            # bpffs answers EPERM to any name with a '.': a naming problem, not a missing privilege.
            raise BpfCallError(f"{what}: bpffs refuses names containing '.'", err)
        if err == errno.EPERM:
            raise PrivilegeError(f"{what}: permission denied (needs root, or CAP_BPF + CAP_NET_ADMIN)")
        raise BpfCallError(what, err)
    return result


def pack_attr(fmt: str, *values: int | bytes) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def address(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def prog_load(prog_type: int, insns: bytes, attach_type: int, name: str) -> int:
    """Load a GPL program of raw instructions (the loader's feature probes); returns its fd."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version, prog_flags,
    # prog_name, prog_ifindex, expected_attach_type
    attr = pack_attr(
        "<IIQQIIQII16sII", prog_type, len(insns) // 8, address(code), address(license_), 0, 0, 0, 0, 0,
        name.encode()[:15], 0, attach_type,
    )  # fmt: skip
    return bpf(BPF_PROG_LOAD, attr, f"load program {name}")


def link_detach(link_fd: int) -> None:
    """Detach a link now, even if pins or other fds still hold it."""
    bpf(BPF_LINK_DETACH, pack_attr("<I", link_fd), "detach link")


def replace_pin(path: str | None, old_fd: int, new_fd: int, detach_old: Callable[[int], None]) -> None:
    """A new attachment runs: take the old one (`old_fd`, -1: none) off, then pin the new one at `path`
    (None: not pinning). In this order, for a moment both count, never neither."""
    if old_fd >= 0 and path is not None:
        detach_old(old_fd)
        os.close(old_fd)
        os.unlink(path)
    if path is not None:
        obj_pin(new_fd, path)


def close_links(link_fds: list[int], *, detach: bool) -> None:
    """Close link fds; with `detach`, take each link off the kernel first (pins no longer hold it)."""
    for fd in link_fds:
        if detach:
            link_detach(fd)
        os.close(fd)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str, *, inner_map_fd: int = 0
) -> int:
    """Create a map without bcc (the agent's own small maps); returns its fd. `name`: at most 15 of
    [A-Za-z0-9_.], what the kernel shows in `bpftool map`; `inner_map_fd`: a map-in-map's template."""
    raw_name = name.encode("ascii")
    if len(raw_name) > 15:
        raise ValueError(f"map name {name!r} is longer than 15 bytes")
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node, then map_name[16]
    attr = pack_attr("<IIIIIII", map_type, key_size, value_size, max_entries, 0, inner_map_fd, 0)
    struct.pack_into("16s", attr, 28, raw_name)
    return bpf(BPF_MAP_CREATE, attr, f"create map {name}")


def obj_pin(fd: int, path: str) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, pack_attr("<QI", address(raw), fd), f"pin {path}", path)


def obj_get(path: str) -> int:
    """Open a pinned object; FileNotFoundError when nothing is pinned there."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    try:
        return bpf(BPF_OBJ_GET, pack_attr("<QI", address(raw), 0), f"open pinned {path}", path)
    except BpfCallError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "nothing pinned", path) from exc
        raise


def prog_fd_by_id(prog_id: int) -> int:
    """An fd for a loaded program (e.g. the one a link runs), to read its info and statistics."""
    return bpf(BPF_PROG_GET_FD_BY_ID, pack_attr("<I", prog_id), f"open program id {prog_id}")


def _info(fd: int, size: int, what: str) -> bytes:
    info = ctypes.create_string_buffer(size)
    bpf(BPF_OBJ_GET_INFO_BY_FD, pack_attr("<IIQ", fd, size, address(info)), what)
    return info.raw


@dataclass(frozen=True, slots=True)
class ProgInfo:
    prog_type: int
    prog_id: int
    tag: bytes
    name: str
    run_time_ns: int  # with kernel.bpf_stats_enabled=1
    run_cnt: int


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232, "program info")
    prog_type, prog_id = struct.unpack_from("<II", raw, 0)
    run_time_ns, run_cnt = struct.unpack_from("<QQ", raw, 192)
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return ProgInfo(prog_type, prog_id, raw[8:16], name, run_time_ns, run_cnt)


@dataclass(frozen=True, slots=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 96, "map info")
    return MapInfo(*struct.unpack_from("<IIIII", raw, 0))


@dataclass(frozen=True, slots=True)
class LinkInfo:
    link_type: int
    link_id: int
    prog_id: int
    pf: int
    hooknum: int
    priority: int


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64, "link info")
    link_type, link_id, prog_id = struct.unpack_from("<III", raw, 0)
    pf, hooknum, priority = struct.unpack_from("<IIi", raw, 16)
    return LinkInfo(link_type, link_id, prog_id, pf, hooknum, priority)


def test_run(prog_fd: int) -> int:
    """Run a netfilter program once on a dummy IPv4 packet (kernel >= 6.6); returns its verdict."""
    packet = bytearray(40)
    packet[0] = 0x45  # IPv4, 20-byte header: the kernel checks it looks like one
    struct.pack_into(">H", packet, 2, len(packet))
    data = ctypes.create_string_buffer(bytes(packet), len(packet))
    # test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration
    attr = pack_attr("<IIIIQQII", prog_fd, 0, len(packet), 0, address(data), 0, 1, 0)
    try:
        bpf(BPF_PROG_TEST_RUN, attr, "test-run netfilter program")
    except BpfCallError as exc:
        if exc.errno in (errno.EINVAL, ENOTSUPP):
            raise KernelUnsupported(
                f"kernel cannot test-run netfilter programs (Linux >= 6.6): {exc}"
            ) from exc
        raise
    return int(struct.unpack_from("<I", attr, 4)[0])


BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_F_TEST_RUN_ON_CPU = 1


def test_run_on_cpu(prog_fd: int, cpu: int) -> int:
    """Run a raw tracepoint program once on `cpu` (an IPI when it is not this CPU; Linux >= 5.10), with
    no context; returns its return value. ENXIO: the CPU is offline."""
    # test: prog_fd, retval, data_size_in/out, data_in/out, repeat, duration, ctx_size_in/out,
    # ctx_in/out, flags, cpu
    attr = pack_attr("<IIIIQQIIIIQQII", prog_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, BPF_F_TEST_RUN_ON_CPU, cpu)
    bpf(BPF_PROG_TEST_RUN, attr, f"test-run program on CPU {cpu}")
    return int(struct.unpack_from("<I", attr, 4)[0])


def map_batches(
    map_fd: int, key_size: int, value_size: int, chunk: int
) -> Iterator[tuple[memoryview, memoryview, int]]:
    """Read a whole hash map, `chunk` entries at a time: yields (keys, values, count) views of two
    buffers that are reused for the next chunk (decode each before asking for the next)."""
    keys = ctypes.create_string_buffer(chunk * key_size)
    values = ctypes.create_string_buffer(chunk * value_size)
    kview, vview = memoryview(keys).cast("B"), memoryview(values).cast("B")
    token_in = ctypes.create_string_buffer(8)
    token_out = ctypes.create_string_buffer(8)
    first = True
    while True:
        # batch: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
        attr = pack_attr(
            "<QQQQIIQQ",
            0 if first else address(token_in),
            address(token_out),
            address(keys),
            address(values),
            chunk,
            map_fd,
            0,
            0,
        )
        done = False
        try:
            bpf(BPF_MAP_LOOKUP_BATCH, attr, "batch-read a map")
        except BpfCallError as exc:
            if exc.errno != errno.ENOENT:
                raise
            done = True  # ENOENT: the last batch, its entries are still valid
        count = int(struct.unpack_from("<I", attr, 32)[0])
        if count:
            yield kview, vview, count
        if done:
            return
        ctypes.memmove(token_in, token_out, 8)
        first = False


def map_delete_batch(map_fd: int, keys: ctypes.Array[ctypes.c_char], count: int) -> int:
    """Delete `count` keys; a key that is already gone stops the batch (ENOENT): returns how many went."""
    attr = pack_attr("<QQQQIIQQ", 0, 0, address(keys), 0, count, map_fd, 0, 0)
    try:
        bpf(BPF_MAP_DELETE_BATCH, attr, "batch-delete flows")
    except BpfCallError as exc:
        if exc.errno != errno.ENOENT:
            raise
    return int(struct.unpack_from("<I", attr, 32)[0])


def map_update_batch(
    map_fd: int, keys: ctypes.Array[ctypes.c_char], values: ctypes.Array[ctypes.c_char], count: int
) -> None:
    """Write `count` keys and values (one after the other in each buffer) in one call; raises on any
    failure (an array map's index out of range: EINVAL)."""
    attr = pack_attr("<QQQQIIQQ", 0, 0, address(keys), address(values), count, map_fd, 0, 0)
    bpf(BPF_MAP_UPDATE_BATCH, attr, "batch-write a map")


def membarrier_global() -> int:
    """membarrier(MEMBARRIER_CMD_GLOBAL): 0, or the errno it was refused with (EINVAL under nohz_full,
    where the kernel will not disturb isolated CPUs; EPERM or ENOSYS from a seccomp profile)."""
    if _libc.syscall(sys_membarrier(), MEMBARRIER_CMD_GLOBAL, 0, 0) < 0:
        return ctypes.get_errno() or errno.EINVAL
    return 0


class GracePeriods:
    """RCU grace periods for the eviction protocol: every BPF program running when one starts (they run
    under RCU) has finished when it ends.

    membarrier(MEMBARRIER_CMD_GLOBAL) calls synchronize_rcu() when more than one CPU is online (the
    kernel skips it on one CPU; there a preemptible kernel could in theory still hold a reader, so the
    eviction race window is only closed on SMP machines, which every Kubernetes node is). Where it is
    refused, the kernel's own wait serves: updating a slot of a map-in-map (BPF_MAP_TYPE_ARRAY_OF_MAPS)
    calls synchronize_rcu() before bpf(2) returns, so that no program still uses the old inner map
    (kernel/bpf/syscall.c, maybe_wait_bpf_programs). Never a sleep: a sleep proves nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.membarrier_errno = 0  # not 0: refused once, the map-in-map is used from then on
        self.by_slot_update = 0  # grace periods waited for through the map-in-map
        self._slot: tuple[int, int] | None = None  # (outer, inner) fds, kept for the process's life

    def wait(self) -> None:
        with self._lock:
            if not self.membarrier_errno:
                err = membarrier_global()
                if not err:
                    return
                self.membarrier_errno = err
                log.warning(
                    "membarrier(MEMBARRIER_CMD_GLOBAL) refused (%s; nohz_full or a seccomp profile): "
                    "grace periods come from map-in-map slot updates",
                    os.strerror(err),
                )
            self._slot_update()
            self.by_slot_update += 1

    def _slot_update(self) -> None:
        if self._slot is None:
            inner = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, "kzt_rcu_inner")
            try:
                outer = map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, "kzt_rcu", inner_map_fd=inner)
            except DatapathError:
                os.close(inner)
                raise
            self._slot = (outer, inner)
        outer, inner = self._slot
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(inner)
        # map_fd, pad, key, value, flags (BPF_ANY)
        attr = pack_attr("<IIQQQ", outer, 0, ctypes.addressof(key), ctypes.addressof(value), 0)
        bpf(BPF_MAP_UPDATE_ELEM, attr, "update a map-in-map slot (an RCU grace period)")


grace_periods = GracePeriods()


def synchronize_rcu() -> None:
    """Wait for an RCU grace period (GracePeriods)."""
    grace_periods.wait()
