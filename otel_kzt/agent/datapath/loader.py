"""Compile, load, attach and pin the datapath in a short-lived child process.

bcc links LLVM/clang (about 100 MB resident once loaded, never given back): the long-running agent must
not load it. `load()` starts `python -m otel_kzt.agent.datapath.loadchild`, which does all of bcc's work
(compile the mode's entry file under `bpf/`, load the programs, install the counter, attach or adopt the
mode's links, pin when pinning) and sends back over a Unix socket, with SCM_RIGHTS, an fd for every map,
for the evictor and the flusher programs and for each link (tc: and for the dispatcher, which the agent
attaches to devices that appear later, `tcwatch.py`, without bcc, after writing their flags in the tcdev
maps the child filled for the start's devices). The parent then owns them: maps are read
with raw `bpf(2)` calls (`bpfmap`), and without pins its link fds are the only hold on the links, so
closing them detaches.

The child runs in the calling thread's network namespace (fork copies it), its log records are replayed
into the parent's loggers, and its errors come back as the same `otel_kzt.errors` class.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import otel_kzt
from otel_kzt import errors
from otel_kzt.agent.datapath import bpffs, bpfsys, kfunc, modes, modeswitch, pins, probe, tc
from otel_kzt.agent.datapath.bpfmap import BpfMap
from otel_kzt.agent.datapath.btf import kernel_btf
from otel_kzt.agent.datapath.flowtables import DYING_SIZE, EVICT_BATCH, boot_to_unix_offset
from otel_kzt.agent.datapath.netns_cookie import current_netns_cookie
from otel_kzt.errors import DatapathError, KztError, ProgramLoadError

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 180.0  # a compile on a busy node takes seconds; this only catches a hung child
DISPATCH_VERSION = 1  # bump when kzt_dispatch changes: its links are then replaced, not adopted
META_COUNTER_HASH, META_DISPATCH_VERSION, META_NETNS_COOKIE, META_BOOT_TO_UNIX = 0, 1, 2, 3
META_CREATED = 4  # Unix ns when this datapath's maps were made: the overflow counters' start (count.h meta)
# Every map the agent uses after the load (`progs` too: a program array is emptied by the kernel once
# no fd or pin refers to it any more).
MAP_NAMES = (*pins.MAP_NAMES, "evict_keys4", "evict_keys6", "evict_count")
_MAX_MSG = 1 << 16


@dataclass(frozen=True)
class LoadRequest:
    node_name: str
    pin: bool
    pin_root: str
    map_size: int
    ephemeral_min: int
    ephemeral_max: int
    mode: str = "netfilter"  # modes.MODES
    tc_devices: tuple[str, ...] = ()
    cgroup_root: str | None = None


@dataclass
class Loaded:
    """What the agent holds after a load: fds it owns and must close."""

    maps: dict[str, int]
    evict_fd: int  # -1 when the kernel cannot test-run netfilter programs (eviction unsupported)
    flush_fd: int  # count.h's kzt_flush; -1 when the agent cannot run it on a chosen CPU
    link_fds: list[int]
    boot_offset: int  # boot-time -> Unix ns, fixed per datapath (pinned in meta)
    cflags: list[str]  # what the program was compiled with (for --print-bpf)
    # tc: the dispatcher (-1 in the other modes) and TcMode.handover, for devices hooked while running
    dispatch_fd: int = -1
    tc: dict[str, Any] | None = None

    def close(self) -> None:
        for fd in [*self.maps.values(), *self.link_fds, self.evict_fd, self.flush_fd, self.dispatch_fd]:
            if fd >= 0:
                os.close(fd)


def cflags(request: LoadRequest, features: probe.Features) -> list[str]:
    """The compile flags of a request: the same in the child that compiles and for --print-bpf."""
    directory = pins.node_dir(request.node_name, request.pin_root)
    return probe.flow_cflags(
        features,
        map_size=request.map_size,
        ephemeral_min=request.ephemeral_min,
        ephemeral_max=request.ephemeral_max,
        evict_batch=EVICT_BATCH,
        dying_size=DYING_SIZE,
        pin_dir=str(directory) if request.pin else None,
    )


# --- parent side -------------------------------------------------------------------------------------------


def load(request: LoadRequest) -> Loaded:
    """Run the child; returns the fds it handed over, or raises the error it reported."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    level = logging.getLogger("otel_kzt.agent").getEffectiveLevel()
    argv = [
        sys.executable,
        "-m",
        "otel_kzt.agent.datapath.loadchild",
        str(theirs.fileno()),
        str(level),
        json.dumps(asdict(request)),
    ]
    # The child imports this very package (and its bpf/ sources), wherever the parent found it.
    package_root = str(Path(otel_kzt.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    with ours:
        try:
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        try:
            loaded = _receive(ours)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    code = proc.wait()
    if loaded is None:
        raise ProgramLoadError(f"the datapath loader exited {code} without a result (its stderr above)")
    return loaded


def _receive(sock: socket.socket) -> Loaded | None:
    sock.settimeout(LOAD_TIMEOUT_S)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, 64)
        except TimeoutError as exc:
            raise DatapathError(f"the datapath loader gave no answer in {LOAD_TIMEOUT_S:.0f} s") from exc
        if not data:
            return None  # the child is gone
        msg = json.loads(data)
        if "log" in msg:
            name, level, text = msg["log"]
            logging.getLogger(name).log(level, "%s", text)
        elif "error" in msg:
            _close_all(fds)
            raise _error(*msg["error"])
        else:
            return _unpack(msg["ok"], fds)


def _unpack(ok: dict[str, Any], fds: list[int]) -> Loaded:
    names: list[str] = ok["fds"]
    if len(names) != len(fds):
        _close_all(fds)
        raise DatapathError(f"the datapath loader sent {len(fds)} fds for {len(names)} names")
    by_name = dict(zip(names, fds, strict=True))
    links = sorted((n for n in by_name if n.startswith("link")), key=lambda n: int(n.removeprefix("link")))
    link_fds = [by_name.pop(name) for name in links]
    evict_fd = by_name.pop("kzt_evict", -1)
    flush_fd = by_name.pop("kzt_flush", -1)
    dispatch_fd = by_name.pop("kzt_dispatch", -1)
    return Loaded(
        maps=by_name,
        evict_fd=evict_fd,
        flush_fd=flush_fd,
        link_fds=link_fds,
        boot_offset=int(ok["boot_offset"]),
        cflags=list(ok["cflags"]),
        dispatch_fd=dispatch_fd,
        tc=ok.get("tc"),
    )


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _error(kind: str, text: str) -> DatapathError:
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, DatapathError):
        return cls(text)
    return DatapathError(text)


# --- child side --------------------------------------------------------------------------------------------


class _SocketLog(logging.Handler):
    """Sends each record to the parent, which logs it under the same logger name."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        self._sock.send(json.dumps({"log": [record.name, record.levelno, record.getMessage()]}).encode())


class _Child:
    """The old in-process load, run once: bcc's module lives only as long as this process."""

    def __init__(self, request: LoadRequest) -> None:
        self.req = request
        self.mode = modes.create(request.mode, tc_devices=request.tc_devices, cgroup_root=request.cgroup_root)
        self.dir = pins.node_dir(request.node_name, request.pin_root)
        self.bpf: Any = None
        self.cflags: list[str] = []
        self.kfuncs: dict[int, int] = {}  # placeholder -> BTF id (kfunc.py): rewritten before each load

    def run(self) -> tuple[dict[str, Any], list[tuple[str, int]]]:
        probe.require_bcc()
        # Kernel BTF is probed here too: its index takes ~30 MB that the agent would otherwise keep.
        features = probe.probe(self.mode)
        r = self.req
        self.cflags = cflags(r, features)
        self.kfuncs = kfunc.ids(kernel_btf())
        if self.req.pin:
            bpffs.require_host_bpffs(self.req.pin_root)
            pins.reset_if_incompatible(r.node_name, r.pin_root, r.map_size)
            pins.make_node_dir(self.dir)
            modeswitch.prepare(self.dir, self.mode)
        from bcc import BPF

        source = probe.entry_source(self.mode)
        try:
            self.bpf = BPF(text=probe.program_text(self.mode).encode(), cflags=self.cflags)
        except Exception as exc:  # bcc raises bare Exception
            raise ProgramLoadError(f"compiling {source} failed: {exc}") from exc
        dispatch_fd = self._load_func("kzt_dispatch")
        names = [*MAP_NAMES, *(tc.DEV_MAPS if isinstance(self.mode, tc.TcMode) else ())]
        fds = [(name, int(self.bpf[name.encode()].map_fd)) for name in names]
        if features.test_run:
            fds.append(("kzt_evict", self._load_func("kzt_evict")))
        if features.flush:  # also without KZT_WC: a previous build (another mode) may have filled them
            fds.append(("kzt_flush", self._load_func("kzt_flush", bpfsys.BPF_PROG_TYPE_RAW_TRACEPOINT, -1)))
        if isinstance(self.mode, tc.TcMode):  # before the counter (a new one reads them) and the links
            self._configure_devices(self.mode)
        self._install_counter()
        fds += [(f"link{i}", fd) for i, fd in enumerate(self._links(dispatch_fd))]
        tc_state = None
        if isinstance(self.mode, tc.TcMode):  # the agent hooks devices that appear later (tcwatch.py)
            fds.append(("kzt_dispatch", dispatch_fd))
            tc_state = self.mode.handover()
        result = {
            "fds": [n for n, _ in fds],
            "boot_offset": self._boot_offset(),
            "cflags": self.cflags,
            "tc": tc_state,
        }
        return result, fds

    def _configure_devices(self, mode: tc.TcMode) -> None:
        """tc: each device to hook gets its flags (Ethernet, VXLAN inside) in the pinned tcdev maps."""
        slots, more = (self.bpf[name.encode()] for name in tc.DEV_MAPS)
        config = tc.DeviceConfig(
            BpfMap(os.dup(slots.map_fd), "tcdev"), BpfMap(os.dup(more.map_fd), "tcdev_more")
        )
        try:
            mode.configure(config, [int(k.value) for k in more])
        finally:
            config.close()

    def _load_func(self, name: str, prog_type: int | None = None, attach_type: int | None = None) -> int:
        """Load one function of the module: the mode's program type unless told otherwise."""
        kfunc.rewrite_bcc(self.bpf, name.encode(), self.kfuncs)
        if prog_type is None:
            prog_type, attach_type = self.mode.prog_type, self.mode.attach_type
        try:
            fn = self.bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
        except Exception as exc:  # bcc raises bare Exception; the verifier log went to stderr
            raise ProgramLoadError(f"loading {name} failed (verifier log above): {exc}") from exc
        return int(fn.fd)

    def _meta(self, index: int) -> int:
        return int(self.bpf[b"meta"][ctypes.c_uint32(index)].value)

    def _set_meta(self, index: int, value: int) -> None:
        self.bpf[b"meta"][ctypes.c_uint32(index)] = ctypes.c_uint64(value)

    def _install_counter(self) -> None:
        want_hash = probe.source_hash(self.mode, self.cflags)
        if self.req.pin and self._meta(META_COUNTER_HASH) == want_hash and self._counter_installed():
            log.info("flow counter adopted unchanged node=%s hash=%016x", self.req.node_name, want_hash)
            return
        counter_fd = self._load_func("kzt_count")
        # One atomic update: each packet runs either the old counter or the new one, never both.
        self.bpf[b"progs"][ctypes.c_int(0)] = ctypes.c_int(counter_fd)
        self._set_meta(META_COUNTER_HASH, want_hash)
        log.info("flow counter installed node=%s hash=%016x", self.req.node_name, want_hash)

    def _counter_installed(self) -> bool:
        try:
            self.bpf[b"progs"][ctypes.c_int(0)]
        except KeyError:
            return False
        return True

    def _links(self, dispatch_fd: int) -> list[int]:
        # Pinned links are adopted only when they run the same dispatcher in this very namespace: after
        # a crash the node's namespace may have been re-created, and a link of a gone namespace counts
        # nothing.
        cookie = current_netns_cookie()
        adopt = (
            self._meta(META_DISPATCH_VERSION) == DISPATCH_VERSION and self._meta(META_NETNS_COOKIE) == cookie
        )
        programs = {"kzt_dispatch": dispatch_fd}
        fds = self.mode.attach(programs, self.dir if self.req.pin else None, adopt=adopt)
        if self.req.pin:
            modeswitch.detach_others(self.dir, self.mode)
        self._set_meta(META_DISPATCH_VERSION, DISPATCH_VERSION)
        self._set_meta(META_NETNS_COOKIE, cookie)
        return fds

    def _boot_offset(self) -> int:
        """The datapath's boot-time -> Unix offset: the pinned one, or a new one stored for the next."""
        offset = self._meta(META_BOOT_TO_UNIX)
        if offset == 0:  # a fresh map (the kernel zero-fills arrays): this datapath's first start
            offset = boot_to_unix_offset()
            self._set_meta(META_BOOT_TO_UNIX, offset)
            self._set_meta(META_CREATED, time.time_ns())
            log.info("boot-to-unix offset recorded node=%s offset_ns=%d", self.req.node_name, offset)
        return offset


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    root = logging.getLogger("otel_kzt")
    root.setLevel(int(argv[1]))
    root.addHandler(_SocketLog(sock))
    root.propagate = False
    try:
        result, fds = _Child(LoadRequest(**json.loads(argv[2]))).run()
    except KztError as exc:
        sock.send(json.dumps({"error": [type(exc).__name__, str(exc)]}).encode())
        return 1
    except Exception as exc:  # anything else still reaches the agent as one clear error
        log.exception("datapath loader failed")
        sock.send(json.dumps({"error": ["DatapathError", f"datapath loader: {exc!r}"]}).encode())
        return 1
    socket.send_fds(sock, [json.dumps({"ok": result}).encode()], [fd for _, fd in fds])
    return 0
