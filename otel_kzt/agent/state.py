"""The agent's own state that outlives its process: which receiver it writes to.

The exporter's receiver choice is sticky (`otel_kzt.agent.export`): an agent that failed over stays on the
replica that works, because moving between two live replicas counts its totals on both until the old
one's series TTL. A restarted agent (an upgrade) must therefore resume on that replica, not on its first
rendezvous choice. The choice is kept in a one-element BPF array map pinned next to the datapath's pins:

    <pin_root>/<node dir>/agent_state     key u32 0 -> value {u32 version, u32 zero, u64 receiver id}

It is the agent's map, not the datapath's: created here with a raw `bpf(BPF_MAP_CREATE)` (no bcc), never
compared by the datapath's layout check, and removed by `otel-kzt agent --cleanup` with every other pin of
the node (`pins.unpin_all` removes the whole directory). The agent opens it before the datapath starts and
pins it again after (`repin`): a reset of an incompatible datapath removes every pin of the node, but
the open map keeps its value. A bpffs pin rather than a file because it is
where the node's agent state already lives: the DaemonSet mounts `/sys/fs/bpf` and nothing writable else.

The receiver id is the first 8 bytes of BLAKE2b of the target's URL (the configured endpoint, or the
endpoint with a resolved address: what `export.expand` calls a target). Version 0 is the zero-filled
element of a fresh array map: nothing stored. Any other unknown version is ignored and logged.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from otel_kzt.agent.datapath import bpfmap, bpfsys, pins
from otel_kzt.agent.datapath.bpfmap import BpfMap
from otel_kzt.errors import DatapathError

log = logging.getLogger(__name__)

STATE_PIN = "agent_state"
MAP_NAME = "kzt_agent_state"  # at most 15 bytes: the kernel's object name limit
BPF_MAP_TYPE_ARRAY = bpfsys.BPF_MAP_TYPE_ARRAY
VERSION = 1
_RECORD = struct.Struct("<IIQ")  # version, reserved (zero), receiver id
_KEY = bpfmap.u32(0)


def receiver_id(url: str) -> int:
    """The 64-bit identity of a target, as stored."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little")


def encode(receiver: int) -> bytes:
    return _RECORD.pack(VERSION, 0, receiver)


def decode(raw: bytes | None, where: str) -> int | None:
    """The stored receiver id, or None when nothing (valid) is stored; a bad record is logged."""
    if raw is None or raw == bytes(len(raw)):
        return None  # nothing ever written (an array element starts zero-filled)
    if len(raw) != _RECORD.size:
        log.warning("ignoring stored receiver: where=%s size=%d want=%d", where, len(raw), _RECORD.size)
        return None
    version, _reserved, receiver = _RECORD.unpack(raw)
    if version != VERSION:
        log.warning("ignoring stored receiver of unknown version: where=%s version=%d", where, version)
        return None
    return int(receiver)


class ReceiverStore(Protocol):
    """Where the exporter keeps its current receiver between processes."""

    def load(self) -> int | None:
        """The stored receiver id, or None."""
        ...

    def save(self, receiver: int) -> None:
        """Store a receiver id (called only when the current receiver changes)."""
        ...


class MemoryReceiverStore:
    """A store in memory holding the same record bytes as the map: tests, and a bad record injected."""

    def __init__(self, raw: bytes | None = None) -> None:
        self.raw = raw
        self.writes = 0

    def load(self) -> int | None:
        return decode(self.raw, "memory")

    def save(self, receiver: int) -> None:
        self.raw = encode(receiver)
        self.writes += 1


class StoredReceiver:
    """The exporter's side of a store: read once, resumed from once, written only when the receiver
    changes. A store that fails is logged, never fatal: the export goes on without it."""

    def __init__(self, store: ReceiverStore | None) -> None:
        self._store = store
        self._saved: int | None = None  # the receiver id in the store
        if store is not None:
            try:
                self._saved = store.load()
            except DatapathError as exc:
                log.warning("cannot read the stored receiver, starting on the first-ranked: error=%s", exc)
        self._pending = self._saved is not None  # resume() consults it once

    @property
    def saved(self) -> int | None:
        """The stored receiver's id (None: nothing stored)."""
        return self._saved

    def resume(self, urls: Sequence[str]) -> str | None:
        """The first time only: the candidate URL matching the stored receiver, else None."""
        if not self._pending:
            return None
        self._pending = False
        match = next((url for url in urls if receiver_id(url) == self._saved), None)
        if match is None:
            log.info("stored receiver not a candidate, starting on the first-ranked: id=%016x", self._saved)
        else:
            log.info("resuming on the stored receiver: endpoint=%s", match)
        return match

    def changed(self, url: str) -> None:
        """The current receiver is now `url`: store it unless that is what is stored."""
        self._pending = False
        receiver = receiver_id(url)
        if self._store is None or receiver == self._saved:
            return
        try:
            self._store.save(receiver)
        except DatapathError as exc:
            log.warning("cannot store the current receiver: endpoint=%s error=%s", url, exc)
            return
        self._saved = receiver


class BpffsReceiverStore:
    """The pinned `agent_state` array map of one node; owns its fd (`close()` is safe twice)."""

    def __init__(self, bpf_map: BpfMap, path: Path, *, created: bool = False) -> None:
        self._map, self.path = bpf_map, path
        self.created = created  # pinned by this process: nothing was stored before it

    @classmethod
    def open(cls, path: Path) -> BpffsReceiverStore:
        """Open the pinned map at `path`, or create and pin it; a map of another shape is replaced."""
        bpf_map = _open_pinned(path)
        if bpf_map is None:
            bpf_map, created = _create_pinned(path)
            return cls(bpf_map, path, created=created)
        return cls(bpf_map, path)

    def withdraw(self) -> None:
        """Undo `open` for a start that failed: a pin this process created goes, with the node directory
        and pin root when they are left empty (an agent that never ran leaves nothing in bpffs). A store
        that was there before stays: it holds an earlier run's choice."""
        if not self.created:
            return
        try:
            self.path.unlink(missing_ok=True)
            self.path.parent.rmdir()
        except OSError as exc:  # ENOTEMPTY: the node's datapath pins, kept
            log.debug("node pin directory kept: dir=%s reason=%s", self.path.parent, exc.strerror)
            return
        pins.remove_empty_root(str(self.path.parent.parent))
        log.info("removed the receiver state pinned for a start that failed: path=%s", self.path)

    def load(self) -> int | None:
        return decode(self._map.lookup(_KEY), str(self.path))

    def save(self, receiver: int) -> None:
        self._map.update(_KEY, encode(receiver))

    def repin(self) -> None:
        """Pin the map again when its pin went while this process held it open: the datapath's reset of
        an incompatible layout removes every pin of the node, and the choice must outlive that too."""
        if self.path.exists():
            return
        try:
            pins.make_node_dir(self.path.parent)
            bpfsys.obj_pin(self._map.fd, str(self.path))
        except (DatapathError, OSError) as exc:
            log.warning("receiver choice not persisted across restarts: path=%s error=%s", self.path, exc)
            return
        log.info("pinned receiver state again after a reset of the node's pins: path=%s", self.path)

    def close(self) -> None:
        self._map.close()


def node_state_path(node_name: str, pin_root: str = pins.DEFAULT_PIN_ROOT) -> Path:
    return pins.node_dir(node_name, pin_root) / STATE_PIN


def open_node_store(node_name: str, pin_root: str = pins.DEFAULT_PIN_ROOT) -> BpffsReceiverStore | None:
    """The node's store, or None (logged) when bpffs refuses: persistence only spares a double count
    after a restart, it is no reason for the agent not to run."""
    path = node_state_path(node_name, pin_root)
    try:
        pins.make_node_dir(path.parent)
        return BpffsReceiverStore.open(path)
    except (DatapathError, OSError) as exc:
        log.warning("receiver choice not persisted across restarts: path=%s error=%s", path, exc)
        return None


def discard_node_store(node_name: str, pin_root: str = pins.DEFAULT_PIN_ROOT) -> None:
    """Remove a stored choice (`--no-pin`: this run stores nothing, so what an earlier run stored would be
    stale for the next pinned one)."""
    path = node_state_path(node_name, pin_root)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot remove a stale stored receiver: path=%s error=%s", path, exc)
        return
    log.info("removed the stored receiver (--no-pin stores none): path=%s", path)


def _open_pinned(path: Path) -> BpfMap | None:
    """The pinned map if it has our shape; one of another shape is unpinned (logged) and None returned."""
    try:
        fd = bpfsys.obj_get(str(path))
    except FileNotFoundError:
        return None
    bpf_map = BpfMap(fd, STATE_PIN)
    shape = (bpf_map.map_type, bpf_map.key_size, bpf_map.value_size)
    if shape == (BPF_MAP_TYPE_ARRAY, len(_KEY), _RECORD.size) and bpf_map.max_entries >= 1:
        return bpf_map
    bpf_map.close()
    log.warning("replacing pinned %s of another shape: path=%s (type, key, value)=%s", STATE_PIN, path, shape)
    path.unlink()
    return None


def _create_pinned(path: Path) -> tuple[BpfMap, bool]:
    """A new pinned map (True), or the one another agent of the node pinned meanwhile (False)."""
    fd = bpfsys.map_create(BPF_MAP_TYPE_ARRAY, len(_KEY), _RECORD.size, 1, MAP_NAME)
    try:
        bpfsys.obj_pin(fd, str(path))
    except bpfsys.BpfCallError as exc:
        os.close(fd)
        if exc.errno != errno.EEXIST:
            raise
        # Pinned by someone else between our look and our pin (two agents of one node): use theirs.
        adopted = _open_pinned(path)
        if adopted is None:
            raise
        return adopted, False
    log.info("created pinned receiver state: path=%s", path)
    return BpfMap(fd, STATE_PIN), True
