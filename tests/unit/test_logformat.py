"""`--log-format json`: one object a line with time, level, logger, msg and the message's key=value context;
`text` stays the classic line; a record of any other shape keeps its whole text."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from otel_kzt import logformat
from otel_kzt.agent import command as agent_command
from otel_kzt.cli import build_parser
from otel_kzt.enricher import command as enricher_command
from otel_kzt.errors import ConfigError


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("otel_kzt.agent.service", logging.WARNING, __file__, 1, msg, args, info)


def as_json(msg: str, *args: object, exc: bool = False) -> dict[str, object]:
    line = logformat.JsonFormatter().format(record(msg, *args, exc=exc))
    assert "\n" not in line
    out: dict[str, object] = json.loads(line)
    return out


def test_context_keys_keep_their_types_and_msg_is_the_text() -> None:
    got = as_json("export: flows=%d sent=%d duration_s=%.3f endpoint=%s ok=%s", 10, 1, 0.12345, "h:1", True)
    assert got["msg"] == "export" and got["level"] == "WARNING" and got["logger"] == "otel_kzt.agent.service"
    assert (got["flows"], got["sent"], got["duration_s"], got["endpoint"], got["ok"]) == (
        10,
        1,
        0.123,
        "h:1",
        True,
    )
    assert str(got["time"]).endswith("Z") and "T" in str(got["time"])


def test_text_placeholders_stay_in_msg() -> None:
    got = as_json("process did not stop within %.0fs, killing pid=%d", 10.0, 42)
    assert (got["msg"], got["pid"]) == ("process did not stop within 10s, killing", 42)
    got = as_json("100%% done: x=%s", "y")
    assert (got["msg"], got["x"]) == ("100% done", "y")
    assert set(got) == {"time", "level", "logger", "msg", "x"}


def test_other_shapes_keep_the_whole_message() -> None:
    assert as_json("plain")["msg"] == "plain"
    assert as_json("a %s b=%s", ["x"], {"k": 1})["b"] == "{'k': 1}"
    assert as_json("replayed %(name)s", {"name": "n"})["msg"] == "replayed n"  # a mapping argument
    got = as_json("%s", "flow counter installed node=n1 hash=ab12")  # the loader's replayed records
    assert (got["msg"], got["node"], got["hash"]) == ("flow counter installed", "n1", "ab12")
    assert as_json("%s", "a=b in the middle")["msg"] == "a=b in the middle"


def test_reserved_names_are_never_overwritten_and_exceptions_travel() -> None:
    got = as_json("stopped: msg=%s level=%s", "x", "y", exc=True)
    assert got["level"] == "WARNING" and "msg=x" in str(got["msg"])
    assert "ValueError: boom" in str(got["exc"])


def test_configure_switches_one_handler_and_leaves_a_foreign_root_alone() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        logformat.configure("text", "INFO", stream=out)  # pytest's handlers there: left alone
        assert root.handlers == saved
        root.handlers = []  # as a fresh process has it
        logformat.configure("text", "INFO", stream=out)
        logformat.configure("json", stream=out)  # the command's config file asked for json
        logging.getLogger("otel_kzt.x").info("export: flows=%d", 3)
        assert len(root.handlers) == 1
    finally:
        root.handlers, root.level = saved, level
    assert json.loads(out.getvalue())["flows"] == 3


def test_both_services_take_the_flag_and_its_yaml_twin(tmp_path: Path) -> None:
    parser = build_parser()
    agent = agent_command.load_config(
        parser.parse_args(["agent", "--node-name", "n", "--log-format", "json"])
    )
    enricher = enricher_command.build_config(parser.parse_args(["enricher", "--log-format", "json"]))
    assert agent.log_format == enricher.log_format == "json"
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_name: n\nlog_format: xml\n")
    with pytest.raises(ConfigError, match="log_format"):
        agent_command.load_config(parser.parse_args(["agent", "--config", str(bad)]), {})
    bad.write_text("log_format: xml\n")
    with pytest.raises(ConfigError, match="log_format"):
        enricher_command.build_config(parser.parse_args(["enricher", "--config", str(bad)]))
