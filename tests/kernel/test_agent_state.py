"""The pinned receiver store on the real kernel: created with raw bpf(2), read back by another process,
replaced when its shape is foreign, removed by `otel-kzt agent --cleanup`. Pins live under a pin root of
their own ("ks-" prefix), removed even on failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from otel_kzt.agent import command, state
from otel_kzt.agent.config import AgentConfig
from otel_kzt.agent.datapath import bpffs, bpfmap, bpfsys, pins
from otel_kzt.agent.datapath.bpfmap import BpfMap
from tests.support.processes import CLI

pytestmark = pytest.mark.kernel

NODE = "ks-node.zone-a.internal"  # dotted like EKS names: the store must use the node's pin dir name

# A separate process, as a restarted agent is: prints what it reads, then stores its argument.
CHILD = """
import sys
from otel_kzt.agent import state
store = state.open_node_store(sys.argv[1], sys.argv[2])
print(store.load())
store.save(int(sys.argv[3]))
store.close()
"""


@pytest.fixture
def pin_root() -> Iterator[str]:
    bpffs.require_host_bpffs(pins.DEFAULT_PIN_ROOT)
    root = f"/sys/fs/bpf/ks-state-{os.getpid()}"
    try:
        yield root
    finally:
        pins.cleanup(NODE, root)
        shutil.rmtree(root, ignore_errors=True)  # bpffs: unlinking a pin removes it


def child(pin_root: str, store_next: int) -> int | None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, NODE, pin_root, str(store_next)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = proc.stdout.strip()
    return None if out == "None" else int(out)


def test_written_choice_is_read_back_by_a_new_process(pin_root: str) -> None:
    first, second = state.receiver_id("http://10.9.0.1:4317"), state.receiver_id("http://10.9.0.2:4317")
    store = state.open_node_store(NODE, pin_root)
    assert store is not None
    assert store.path == Path(pin_root) / pins.pin_dir_name(NODE) / state.STATE_PIN
    assert store.load() is None  # a fresh map: nothing stored
    store.save(first)
    store.close()
    store.close()
    assert child(pin_root, second) == first  # another process reads what this one wrote
    again = state.open_node_store(NODE, pin_root)  # and this one, reopening, what the other wrote
    assert again is not None
    assert again.load() == second
    again.close()


def test_map_is_a_one_element_array_of_the_record(pin_root: str) -> None:
    store = state.open_node_store(NODE, pin_root)
    assert store is not None
    store.close()
    fd = bpfsys.obj_get(str(state.node_state_path(NODE, pin_root)))
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    assert (info.map_type, info.key_size, info.value_size, info.max_entries) == (
        state.BPF_MAP_TYPE_ARRAY,
        4,
        16,
        1,
    )


def test_bad_record_in_the_map_is_ignored(pin_root: str, caplog: pytest.LogCaptureFixture) -> None:
    store = state.open_node_store(NODE, pin_root)
    assert store is not None
    store.close()
    raw = BpfMap(bpfsys.obj_get(str(store.path)), "test")
    raw.update(bpfmap.u32(0), struct.pack("<IIQ", 99, 0, 42))  # a future agent's format
    raw.close()
    reopened = state.open_node_store(NODE, pin_root)
    assert reopened is not None
    with caplog.at_level(logging.WARNING, logger="otel_kzt.agent.state"):
        assert reopened.load() is None
    assert "unknown version" in caplog.text
    reopened.close()


def test_map_of_another_shape_is_replaced(pin_root: str, caplog: pytest.LogCaptureFixture) -> None:
    path = state.node_state_path(NODE, pin_root)
    pins.make_node_dir(path.parent)
    fd = bpfsys.map_create(state.BPF_MAP_TYPE_ARRAY, 4, 8, 1, "ks_foreign")
    try:
        bpfsys.obj_pin(fd, str(path))
    finally:
        os.close(fd)
    with caplog.at_level(logging.WARNING, logger="otel_kzt.agent.state"):
        store = state.open_node_store(NODE, pin_root)
    assert store is not None and "another shape" in caplog.text
    store.save(7)
    store.close()
    assert child(pin_root, 8) == 7


def test_cleanup_command_removes_it(pin_root: str) -> None:
    store = state.open_node_store(NODE, pin_root)
    assert store is not None
    store.save(1)
    store.close()
    subprocess.run(
        [
            *CLI,
            "agent",
            "--cleanup",
            "--node-name",
            NODE,
            "--pin-root",
            pin_root,
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert not state.node_state_path(NODE, pin_root).exists()
    assert not pins.node_dir(NODE, pin_root).exists()


def test_agent_wiring_persists_only_when_pinned(pin_root: str) -> None:
    unpinned = AgentConfig(node_name=NODE, pin=False, pin_root=pin_root)
    pinned = AgentConfig(node_name=NODE, pin=True, pin_root=pin_root)
    with ExitStack() as stack:
        assert command._receiver_store(unpinned, stack) is None
        assert not pins.node_dir(NODE, pin_root).exists()
        store = command._receiver_store(pinned, stack)
        assert store is not None and store.path.exists()
        store.save(5)
    # --no-pin after a pinned run: the stored choice would be stale later, so it goes once the datapath
    # started (not before: a start that fails leaves it, test_agent_mode_missing.py)
    with ExitStack() as stack:
        assert command._receiver_store(unpinned, stack) is None
        assert state.node_state_path(NODE, pin_root).exists()
    command._discard_receiver_store(unpinned)
    assert not state.node_state_path(NODE, pin_root).exists()


def test_choice_outlives_a_reset_of_the_node_pins(pin_root: str) -> None:
    """The datapath's reset of an incompatible layout unpins the whole node while the agent holds the
    store open: pinned again, the value is still there for the next process."""
    store = state.open_node_store(NODE, pin_root)
    assert store is not None
    store.save(11)
    pins.cleanup(NODE, pin_root)  # what pins.reset_if_incompatible does
    assert not store.path.exists()
    store.repin()
    store.repin()  # already pinned: nothing to do
    store.close()
    assert child(pin_root, 12) == 11
