"""Agent configuration: flags over YAML over OTEL_* environment, and errors that name the field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from otel_kzt.agent import command
from otel_kzt.agent.config import GRPC, HTTP_PROTOBUF, KEYS, from_values
from otel_kzt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    cfg = from_values({"node_name": "n1"}, {})
    assert cfg.otlp.endpoints == ("http://localhost:4317",) and cfg.otlp.protocol == GRPC
    assert (cfg.interval_s, cfg.idle_timeout_s, cfg.pin, cfg.map_size) == (10.0, 300.0, True, 65536)
    assert cfg.ephemeral_ports == (32768, 65535) and cfg.overlay_ports == (4789, 8472, 6081)


def test_environment() -> None:
    env = {
        "NODE_NAME": "n2",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/base/",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-tenant = t1",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    cfg = from_values({}, env)
    assert cfg.node_name == "n2"
    assert cfg.otlp.endpoints == ("http://collector:4318/base/v1/metrics",)  # generic: path appended
    assert cfg.otlp.protocol == HTTP_PROTOBUF and cfg.otlp.compression == "gzip"
    assert cfg.otlp.headers == (("authorization", "Bearer abc"), ("x-tenant", "t1"))
    assert cfg.otlp.timeout_s == 2.5 and cfg.otlp.insecure
    env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = "http://m:4318/custom"
    assert from_values({}, env).otlp.endpoints == ("http://m:4318/custom",)  # signal-specific: as is


def test_flags_win_over_yaml_which_wins_over_env(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("node_name: from-file\ninterval: 2s\notlp_endpoint: http://file:4317\nmap_size: 1024\n")
    env = {"NODE_NAME": "from-env", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317"}
    args = parse(["--config", str(path), "--interval", "500ms", "--no-pin"])
    cfg = command.load_config(args, env)
    assert (cfg.node_name, cfg.interval_s, cfg.map_size, cfg.pin) == ("from-file", 0.5, 1024, False)
    assert cfg.otlp.endpoints == ("http://file:4317",)
    args = parse(["--config", str(path), "--node-name", "flag", "--otlp-endpoint", "a:1,b:2"])
    cfg = command.load_config(args, env)
    assert cfg.node_name == "flag" and cfg.otlp.endpoints == ("a:1", "b:2")


def test_sample_config_is_valid_and_every_flag_has_a_yaml_twin() -> None:
    args = parse(["--config", str(REPO / "config" / "agent.yaml"), "--node-name", "n1"])
    cfg = command.load_config(args, {})
    assert cfg.node_name == "n1" and cfg.interval_s > 0
    dests = {a.dest for a in argparse_actions()} - {"help", "config", "cleanup", "print_bpf"}
    assert dests <= KEYS


def argparse_actions() -> list[argparse.Action]:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser._actions


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({}, "node_name"),
        ({"node_name": "a/b"}, "node_name"),
        ({"node_name": "n", "interval": "soon"}, "interval"),
        ({"node_name": "n", "interval": "0s"}, "interval"),
        ({"node_name": "n", "otlp_protocol": "thrift"}, "otlp_protocol"),
        ({"node_name": "n", "otlp_endpoint": "ftp://x:1"}, "otlp_endpoint"),
        ({"node_name": "n", "otlp_endpoint": "http://x:99999"}, "otlp_endpoint"),
        ({"node_name": "n", "otlp_protocol": "http/protobuf", "otlp_endpoint": "x:4318"}, "otlp_endpoint"),
        ({"node_name": "n", "otlp_headers": "novalue"}, "otlp_headers"),
        ({"node_name": "n", "otlp_compression": "zstd"}, "otlp_compression"),
        ({"node_name": "n", "otlp_certificate": "/nonexistent.pem"}, "otlp_certificate"),
        ({"node_name": "n", "map_size": "big"}, "map_size"),
        ({"node_name": "n", "map_size": 1}, "map_size"),
        ({"node_name": "n", "ephemeral_ports": "60000-1000"}, "ephemeral_ports"),
        ({"node_name": "n", "ephemeral_ports": "32768"}, "ephemeral_ports"),
        ({"node_name": "n", "overlay_ports": [4789, 70000]}, "overlay_ports"),
        ({"node_name": "n", "pin": "maybe"}, "pin"),
        ({"node_name": "n", "kube_metadata": "/nonexistent.yaml"}, "kube_metadata"),
        ({"node_name": "n", "intervall": "1s"}, "intervall"),
    ],
)
def test_bad_values_name_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_values(values, {})
    assert info.value.field == field


def test_bad_env_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        from_values({"node_name": "n"}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "fast"})
    assert info.value.field == "otlp_timeout"


def test_run_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from otel_kzt import cli

    (tmp_path / "a.yaml").write_text("node_name: n\nidle_timeout: forever\n")
    code = cli.main(["agent", "--config", str(tmp_path / "a.yaml")])
    assert code == 2
    assert "idle_timeout" in capsys.readouterr().err


def test_datapath_choice_devices_and_cgroup_root() -> None:
    assert from_values({"node_name": "n1"}).datapath == "auto"
    config = from_values(
        {"node_name": "n1", "datapath": "tc", "tc_devices": "eth*, ens5", "cgroup_root": "/sys/fs/cgroup/x"}
    )
    assert (config.datapath, config.tc_devices, config.cgroup_root) == (
        "tc",
        ("eth*", "ens5"),
        "/sys/fs/cgroup/x",
    )
    assert from_values({"node_name": "n1", "tc_devices": ["eth0", "eth1"]}).tc_devices == ("eth0", "eth1")
    with pytest.raises(ConfigError, match="datapath: must be one of auto, netfilter, tc, cgroup"):
        from_values({"node_name": "n1", "datapath": "xdp"})
    for bad in ("a/b", "way-too-long-device-name", "eth 0"):
        with pytest.raises(ConfigError, match="tc_devices"):
            from_values({"node_name": "n1", "tc_devices": bad})
