"""Pure parts of the datapath: the flow map layout (mirror of bpf/flow.h), config validation, pin paths."""

from __future__ import annotations

import re
import struct

import pytest

from otel_kzt.agent import flows
from otel_kzt.agent.datapath import DatapathConfig, flowmap, pins
from otel_kzt.agent.datapath.probe import BPF_DIR
from otel_kzt.agent.flows import FlowKey
from otel_kzt.errors import ConfigError


def test_layout_sizes_match_the_c_header() -> None:
    header = (BPF_DIR / "flow.h").read_text()
    for name, layout in (("flow_key4", flowmap.V4), ("flow_key6", flowmap.V6)):
        body = re.search(rf"struct {name} \{{(.*?)\}}", header, re.S)
        assert body is not None and f"src[{layout.width}]" in body.group(1)
        # proto u8, port_side u8, port u16, src, dst
        assert layout.key.size == 4 + 2 * layout.width
        # bytes, packets, first_seen (u64), dead + pad (u32), the key, a u32 pad to 8-byte alignment
        assert layout.value.size == 8 * 3 + 8 + layout.key.size + 4
        assert layout.value.size % 8 == 0


@pytest.mark.parametrize(
    ("fields", "raw"),
    [
        (
            (4, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 17, 0, 53),
            bytes([17, 2, 53, 0, 10, 0, 0, 1, 10, 0, 0, 2]),
        ),
        (
            (4, bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), 6, 443, 0),
            bytes([6, 1, 187, 1, 10, 0, 0, 2, 10, 0, 0, 1]),
        ),
        ((6, bytes(range(16)), bytes(range(16, 32)), 58, 0, 0, 3), bytes([58, 12, 0, 0, *range(32)])),
    ],
)
def test_key_is_the_map_key_and_reads_back(fields: tuple[int, ...], raw: bytes) -> None:
    key = FlowKey(*fields)  # type: ignore[arg-type]
    assert key == raw and len(key) == flowmap.LAYOUTS[key.family].key.size
    read = FlowKey.of_raw(raw)
    assert read == key and hash(read) == hash(key) and type(read) is FlowKey
    family, src, dst, proto, sport, dport, *origin = fields
    assert (read.family, read.src, read.dst, read.proto, read.src_port, read.dst_port) == (
        family,
        src,
        dst,
        proto,
        sport,
        dport,
    )
    assert read.origin == (origin[0] if origin else 0)
    assert repr(read).startswith(f"FlowKey(family={family}, src={src!r}")


def test_key_wire_bytes() -> None:
    raw = FlowKey(4, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 6, 0, 8080)
    assert raw == bytes([6, flows.PORT_DST]) + struct.pack("<H", 8080) + bytes([10, 0, 0, 1, 10, 0, 0, 2])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((4, bytes(4), bytes(4), 6, 80, 8080), "at most one port"),
        ((4, bytes(16), bytes(4), 6, 0, 80), "4 bytes"),
        ((6, bytes(16), bytes(4), 6, 0, 80), "16 bytes"),
        ((5, bytes(4), bytes(4), 6, 0, 80), "unknown address family"),
        ((4, bytes(4), bytes(4), 256, 0, 80), "out of range"),
        ((4, bytes(4), bytes(4), 6, 0, 65536), "out of range"),
        ((4, bytes(4), bytes(4), 6, 0, 80, 4), "unknown origin"),
    ],
)
def test_bad_keys_are_refused(fields: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowKey(*fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 11, 13, 35, 37])
def test_raw_keys_of_another_size_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="12 or 36 bytes"):
        FlowKey.of_raw(bytes(size))


def test_value_decoding() -> None:
    raw = struct.pack("<QQQII", 1500, 3, 123456789, 1, 0) + bytes(12 + 4)
    assert flowmap.decode_value(flowmap.V4, raw) == (1500, 3, 123456789, True)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"node_name": "../etc"}, "node_name"),
        ({"node_name": "Node_1"}, "node_name"),
        ({"map_size": 0}, "map_size"),
        ({"ephemeral_min": 40000, "ephemeral_max": 30000}, "ephemeral_min"),
    ],
)
def test_config_validation_names_the_field(overrides: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"node_name": "node-a"} | overrides
    with pytest.raises(ConfigError) as err:
        DatapathConfig(**values).validate()  # type: ignore[arg-type]
    assert err.value.field == field


def test_pin_dir_per_node() -> None:
    # bpffs refuses '.' in names: dotted (EKS) node names map to '_', which a DNS subdomain never holds.
    assert str(pins.node_dir("ip-10-0-1-5.ec2.internal")) == "/sys/fs/bpf/otel-kzt/ip-10-0-1-5_ec2_internal"
    assert str(pins.node_dir("n1", "/sys/fs/bpf/x")) == "/sys/fs/bpf/x/n1"


def test_pin_dir_names_never_collide_and_hold_no_dot() -> None:
    names = ["a.b-c", "a-b.c", "a.b.c", "a-b-c", "ab.c", "a.bc"]
    mapped = [pins.pin_dir_name(n) for n in names]
    assert len(set(mapped)) == len(names)
    assert not any("." in m for m in mapped)
    with pytest.raises(ConfigError):
        pins.pin_dir_name("a_b")  # not a node name: '_' is what the mapping produces


def test_pin_root_with_a_dot_under_bpffs_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        DatapathConfig(node_name="n1", pin_root="/sys/fs/bpf/otel.kzt").validate()
    assert err.value.field == "pin_root" and "'.'" in str(err.value)
    DatapathConfig(node_name="n1", pin_root="/sys/fs/bpf/otel-kzt").validate()


def test_loader_errors_come_back_as_the_same_datapath_class() -> None:
    from otel_kzt.agent.datapath import loader
    from otel_kzt.errors import BccMissing, DatapathError, PrivilegeError

    assert type(loader._error("BccMissing", "install bcc")) is BccMissing
    assert type(loader._error("PrivilegeError", "no CAP_BPF")) is PrivilegeError
    # Not a datapath error class (or no class at all): still one clear DatapathError, text kept.
    for kind in ("ConfigError", "ValueError", "NoSuchThing"):
        err = loader._error(kind, "text")
        assert type(err) is DatapathError and str(err) == "text"


def test_loader_result_names_each_fd() -> None:
    from otel_kzt.agent.datapath import loader

    names = ["flows4", "link0", "kzt_evict", "link1", "meta"]
    loaded = loader._unpack({"fds": names, "boot_offset": 7, "cflags": ["-DX=1"]}, [10, 11, 12, 13, 14])
    assert loaded.maps == {"flows4": 10, "meta": 14}
    assert (loaded.link_fds, loaded.evict_fd) == ([11, 13], 12)
    assert (loaded.boot_offset, loaded.cflags) == (7, ["-DX=1"])
