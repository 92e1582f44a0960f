"""Enricher configuration: defaults, YAML twins of the flags, flags over the file, errors naming the field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from otel_kzt import schema
from otel_kzt.cli import main
from otel_kzt.enricher import command
from otel_kzt.enricher.config import PROTOCOL_HTTP, default_config, from_mapping
from otel_kzt.enricher.processing.cost import DEFAULT_PRICES, load_prices
from otel_kzt.errors import ConfigError
from otel_kzt.schema import TrafficClass

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_sample_yaml_equals_defaults() -> None:
    cfg = command.build_config(parse("--config", str(REPO / "config" / "enricher.yaml")))
    assert cfg == default_config()


def test_every_flag_has_a_yaml_twin() -> None:
    # flag dest -> YAML key where the names differ; the port shorthands are twins of the *_endpoint keys
    renamed = {
        "cluster_cidr": "cluster_cidrs",
        "export_endpoint": "exporters",
        "export_protocol": "exporters",
        "export_header": "exporters",
        "otlp_grpc_port": "grpc_endpoint",
        "otlp_http_port": "http_endpoint",
        "metrics_port": "metrics_endpoint",
    }
    sample = (REPO / "config" / "enricher.yaml").read_text()
    for dest in vars(parse()):
        if dest != "config":
            key = renamed.get(dest, dest)
            assert f"{key}:" in sample, f"--{dest.replace('_', '-')} has no `{key}` in config/enricher.yaml"
            # ... and the loader knows it (durations are read without the `_s` of the field)
            durations = {
                "series_ttl",
                "series_lateness",
                "agent_interval",
                "shutdown_timeout",
                "checkpoint_interval",
                "savings_window",
                "header_timeout",
                "body_timeout",
            }
            assert key in durations or key in default_config().__dataclass_fields__


def test_state_file_and_checkpoint_interval(tmp_path: Path) -> None:
    file = tmp_path / "e.yaml"
    file.write_text("state_file: /var/lib/otel-kzt/s.json.gz\ncheckpoint_interval: 1m\n")
    cfg = command.build_config(parse("--config", str(file)))
    assert cfg.state_file == "/var/lib/otel-kzt/s.json.gz" and cfg.checkpoint_interval_s == 60.0
    cfg = command.build_config(
        parse("--config", str(file), "--state-file", "x", "--checkpoint-interval", "500ms")
    )
    assert cfg.state_file == "x" and cfg.checkpoint_interval_s == 0.5
    assert default_config().state_file is None  # off unless asked for: today's behaviour
    with pytest.raises(ConfigError, match="checkpoint_interval"):
        command.build_config(parse("--checkpoint-interval", "0s"))


def test_flags_win_over_file(tmp_path: Path) -> None:
    file = tmp_path / "e.yaml"
    file.write_text("metrics_endpoint: 127.0.0.1:1\nseries_ttl: 2m\nexporters: [{endpoint: 'a:1'}]\n")
    cfg = command.build_config(parse("--config", str(file), "--metrics-port", "9999", "--series-ttl", "30s"))
    assert cfg.metrics_endpoint == "0.0.0.0:9999" and cfg.series_ttl_s == 30.0
    assert [e.endpoint for e in cfg.exporters] == ["a:1"]
    cfg = command.build_config(
        parse(
            "--config",
            str(file),
            "--export-endpoint",
            "http://b:4318",
            "--export-protocol",
            PROTOCOL_HTTP,
            "--export-header",
            "X-Org=t1",
            "--flow-aggregation",
            "kzt.traffic.class,source.k8s.pod.name",
            "--no-flow-logs-stdout",
        )
    )
    assert [(e.endpoint, e.protocol, e.headers) for e in cfg.exporters] == [
        ("http://b:4318", PROTOCOL_HTTP, (("x-org", "t1"),))
    ]
    assert cfg.flow_aggregation == (schema.TRAFFIC_CLASS, schema.SOURCE_POD_NAME)
    assert cfg.flow_logs_stdout is False


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("max_series: 0\n", "max_series"),
        ("max_series: many\n", "max_series"),
        ("series_ttl: soon\n", "series_ttl"),
        ("grpc_endpoint: nowhere\n", "grpc_endpoint"),
        ("cluster_cidrs: [10.0.0.0/33]\n", "cluster_cidrs"),
        ("flow_aggregation: [source.k8s.pod.nam]\n", "flow_aggregation"),
        ("exporters: [{endpoint: 'x:1', protocol: thrift}]\n", "exporters[0].protocol"),
        ("exporters: [{endpoint: 'x:1', retries: 3}]\n", "exporters[0].retries"),
        ("exporters: [{protocol: grpc}]\n", "exporters[0].endpoint"),
        ("tls_cert_file: /a.pem\n", "tls_cert_file"),
        ("flow_logs_stdout: yes please\n", "flow_logs_stdout"),
        ("colour: blue\n", "colour"),
    ],
)
def test_bad_yaml_names_the_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    file = tmp_path / "e.yaml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        command.build_config(parse("--config", str(file)))
    assert info.value.field == field


def test_bad_flag_exits_2_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enricher", "--max-series", "-5"]) == 2
    assert "max_series" in capsys.readouterr().err
    assert main(["enricher", "--export-header", "X=1"]) == 2
    assert "--export-endpoint" in capsys.readouterr().err


def test_from_mapping_reads_durations_and_exporters() -> None:
    cfg = from_mapping(
        {
            "series_ttl": "90s",
            "exporters": ["h:1", {"endpoint": "http://x", "timeout": "500ms", "protocol": PROTOCOL_HTTP}],
        }
    )
    assert cfg.series_ttl_s == 90.0
    assert cfg.exporters[1].timeout_s == 0.5 and cfg.exporters[0].endpoint == "h:1"


def test_prices_file_equals_built_in_defaults() -> None:
    table = load_prices(REPO / "config" / "prices.yaml", "aws")
    default = load_prices(None, "aws")
    for provider in DEFAULT_PRICES:
        for cls in TrafficClass:
            assert table.per_byte(cls, provider) == default.per_byte(cls, provider), (provider, cls)
    assert table.per_byte(TrafficClass.CROSS_ZONE, "gcp") == pytest.approx(0.01 / 1e9)
    assert table.per_byte(TrafficClass.CROSS_ZONE, None) == pytest.approx(0.02 / 1e9)  # default provider
    assert table.per_byte(TrafficClass.SAME_ZONE, "aws") == 0


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("aws: {cross-zon: 0.1}\n", "prices_file.aws.cross-zon"),
        ("aws: {external: -1}\n", "prices_file.aws.external"),
        ("aws: 3\n", "prices_file.aws"),
    ],
)
def test_bad_prices_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_prices(file, "aws")
    assert info.value.field == field
    with pytest.raises(ConfigError, match="default_provider"):
        load_prices(None, "oracle")


@pytest.mark.parametrize(
    ("argv", "field", "says"),
    [
        (["--series-ttl", "0"], "series_ttl", "positive duration"),
        (["--series-ttl", "20s"], "series_ttl", "agent_interval 10s"),
        (["--series-ttl", "2m", "--agent-interval", "1m"], "series_ttl", "less than 3 agent intervals"),
        (["--series-lateness", "5m"], "series_lateness", "below series_ttl"),
        (["--max-tombstones", "-1"], "max_tombstones", "negative"),
        (["--agent-interval", "0s"], "agent_interval", "positive duration"),
        (["--checkpoint-interval", "0"], "checkpoint_interval", "positive duration"),
        (["--shutdown-timeout", "0s"], "shutdown_timeout", "positive duration"),
        (["--grpc-endpoint", ":4318"], "http_endpoint", "port 4318 is also grpc_endpoint's"),
        (["--metrics-port", "4317"], "metrics_endpoint", "port 4317 is also grpc_endpoint's"),
        (["--max-inflight-bytes", "1000", "--max-request-bytes", "1001"], "max_inflight_bytes", "never be"),
        (["--max-connections", "0"], "max_connections", "positive integer"),
        (["--max-concurrent-calls", "-1"], "max_concurrent_calls", "positive integer"),
        (["--grpc-workers", "0"], "grpc_workers", "positive integer"),
    ],
)
def test_fields_that_do_not_fit_together_are_refused_naming_the_field(
    argv: list[str], field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        command.build_config(parse(*argv))
    assert info.value.field == field and says in info.value.message


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("series_ttl: .inf\n", "series_ttl"),
        ("exporters: [{endpoint: 'x:1', timeout: 0s}]\n", "exporters[0].timeout"),
        ("bearer_token: a\nbearer_token_file: /t\n", "bearer_token_file"),
    ],
)
def test_bad_combinations_in_yaml_name_the_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    file = tmp_path / "e.yaml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        command.build_config(parse("--config", str(file)))
    assert info.value.field == field


def test_counting_bounds_reach_the_core(tmp_path: Path) -> None:
    cfg = command.build_config(
        parse(
            "--series-ttl",
            "1m",
            "--agent-interval",
            "20s",
            "--series-lateness",
            "2h",
            "--max-tombstones",
            "7",
        )
    )
    assert (cfg.series_ttl_s, cfg.agent_interval_s, cfg.series_lateness_s, cfg.max_tombstones) == (
        60.0,
        20.0,
        7200.0,
        7,
    )
    ports = ("--grpc-endpoint", "127.0.0.1:0", "--http-endpoint", "127.0.0.1:0", "--metrics-port", "0")
    assert command.build_config(parse(*ports)).validate()  # port 0 (any free port) may repeat
