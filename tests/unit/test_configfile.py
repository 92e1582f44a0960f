from __future__ import annotations

import pytest

from otel_kzt.configfile import check_keys, load_yaml, merge, parse_duration
from otel_kzt.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("10", 10.0), (3, 3.0), ("1.5s", 1.5)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text, "interval") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "ten", "5d", "-1s", True, -2])
def test_bad_durations_name_the_field(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, "agent.interval")  # type: ignore[arg-type]
    assert info.value.field == "agent.interval"


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"agent\.intreval: unknown key"):
        check_keys({"intreval": "1s"}, {"interval"}, "agent")


def test_flags_win_but_unset_flags_do_not(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text("interval: 5s\nnode_name: a\n")
    merged = merge(load_yaml(path), {"interval": "1s", "node_name": None})
    assert merged == {"interval": "1s", "node_name": "a"}


def test_bad_yaml_names_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
