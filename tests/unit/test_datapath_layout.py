"""Pure parts of the datapath: the flow map layout (mirror of bpf/flow.h), config validation, pin paths."""

from __future__ import annotations

import re
import struct

import pytest

from otel_kzt.agent import flowmap, pins
from otel_kzt.agent.datapath import DatapathConfig
from otel_kzt.agent.flows import FlowKey
from otel_kzt.agent.probe import FLOW_HEADER
from otel_kzt.errors import ConfigError


def test_layout_sizes_match_the_c_header() -> None:
    header = FLOW_HEADER.read_text()
    key_body = re.search(r"struct flow_key \{(.*?)\};", header, re.S)
    assert key_body is not None
    # u8 family, proto, port_side, pad0; u16 port, pad1; u8 src[16], dst[16]
    assert flowmap.KEY_SIZE == 4 + 4 + 16 + 16 == 40
    assert flowmap.VALUE_SIZE == 8 * 3 + 4 + 4 + flowmap.KEY_SIZE
    assert "port_side" in key_body.group(1) and "dst[16]" in key_body.group(1)


@pytest.mark.parametrize(
    "key",
    [
        FlowKey(4, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 17, 0, 53),
        FlowKey(4, bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), 6, 443, 0),
        FlowKey(6, bytes(range(16)), bytes(range(16, 32)), 58, 0, 0),
    ],
)
def test_key_round_trip(key: FlowKey) -> None:
    raw = flowmap.encode_key(key)
    assert len(raw) == flowmap.KEY_SIZE
    assert flowmap.decode_key(raw) == key


def test_key_wire_bytes() -> None:
    raw = flowmap.encode_key(FlowKey(4, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 6, 0, 8080))
    assert raw[:8] == bytes([4, 6, flowmap.PORT_DST, 0]) + struct.pack("<H", 8080) + b"\0\0"
    assert raw[8:12] == bytes([10, 0, 0, 1]) and raw[12:24] == bytes(12)


def test_key_with_two_ports_is_refused() -> None:
    with pytest.raises(ValueError, match="at most one port"):
        flowmap.encode_key(FlowKey(4, bytes(4), bytes(4), 6, 80, 8080))


def test_value_decoding() -> None:
    raw = struct.pack("<QQQII", 1500, 3, 123456789, 1, 0) + bytes(40)
    assert flowmap.decode_value(raw) == (1500, 3, 123456789, True)


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
    assert str(pins.node_dir("ip-10-0-1-5.ec2.internal")) == "/sys/fs/bpf/otel-kzt/ip-10-0-1-5.ec2.internal"
    assert str(pins.node_dir("n1", "/sys/fs/bpf/x")) == "/sys/fs/bpf/x/n1"
