"""Log output of both services: `--log-format text` (the default) or `json`, one object a line.

The code logs the house way, `log.info("export: flows=%d sent=%d", flows, sent)`: a message, then its
context as `key=value` pairs. The JSON formatter reads those pairs from the *format string*, so each key
gets the argument itself (an int stays an int) and the text in front becomes `msg`:

    {"time": "2026-11-22T10:00:00.123Z", "level": "INFO", "logger": "otel_kzt.agent.service",
     "msg": "export", "flows": 10, "sent": 1}

A message already formatted elsewhere (the datapath loader's records, replayed as `"%s"`) is split the
same way when it ends in `key=value` words. Anything else keeps its whole text as `msg`; an exception adds
`exc`. Nothing is lost to a formatting problem: the fallback is the plain message.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Final, TextIO

TEXT: Final = "text"
JSON: Final = "json"
FORMATS: Final = (TEXT, JSON)
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"

# A %-placeholder (named ones are left to the fallback) and a `key=` written right before it.
_SPEC = r"%[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa]"
_PLACEHOLDER: Final = re.compile(rf"%%|(?:(?<![\w.])([A-Za-z_][\w.]*)=)?({_SPEC})")
_RESERVED: Final = frozenset({"time", "level", "logger", "msg", "exc"})
_WORD_PAIR: Final = re.compile(r"(?<!\S)([A-Za-z_][\w.]*)=(\S*)")


def _split_text(message: str) -> tuple[str, dict[str, Any]]:
    """`"text: a=1 b=x"` -> ("text", {"a": 1, "b": "x"}) when every word after the first pair is a pair."""
    first = _WORD_PAIR.search(message)
    if first is None:
        return message, {}
    tail = message[first.start() :].split()
    pairs = [_WORD_PAIR.fullmatch(word) for word in tail]
    if not all(pairs) or any(p.group(1) in _RESERVED for p in pairs if p):
        return message, {}
    keys = {p.group(1): int(p.group(2)) if p.group(2).isdigit() else p.group(2) for p in pairs if p}
    return message[: first.start()].strip().rstrip(":,;"), keys


def context(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """(msg, context keys) of a record; (the formatted message, {}) when its format has another shape."""
    fmt, args = record.msg, record.args
    if fmt == "%s" and isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], str):
        return _split_text(args[0])
    if not isinstance(fmt, str) or not isinstance(args, tuple) or "%(" in fmt:
        return record.getMessage(), {}
    keys: dict[str, Any] = {}
    text: list[str] = []
    rest: list[object] = []  # arguments of placeholders that are part of the text
    at = position = 0
    for match in _PLACEHOLDER.finditer(fmt):
        text.append(fmt[position : match.start()])
        position = match.end()
        if match.group(0) == "%%":
            text.append("%%")
            continue
        if "*" in match.group(2) or at >= len(args):
            return record.getMessage(), {}
        key, value = match.group(1), args[at]
        at += 1
        if key is None or key in _RESERVED:
            text.append(match.group(0))
            rest.append(value)
        else:
            keys[key] = _typed(match.group(2), value)
    text.append(fmt[position:])
    if at != len(args):
        return record.getMessage(), {}
    msg = " ".join("".join(text).split()).rstrip(":,;")
    try:
        return (msg % tuple(rest) if rest or "%%" in msg else msg), keys
    except (TypeError, ValueError):
        return record.getMessage(), {}


def _typed(spec: str, value: object) -> Any:
    """The argument as JSON carries it: numbers stay numbers, formatted as the placeholder asks."""
    kind = spec[-1]
    try:
        if kind in "diu" and isinstance(value, int | float) and not isinstance(value, bool):
            return int(spec % value)
        if kind in "eEfFgG" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(spec % value)
        if isinstance(value, bool | int | float) and kind in "sr":
            return value
        return spec % (value,)
    except (TypeError, ValueError):
        return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg, keys = context(record)
        seconds = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {"time": stamp, "level": record.levelname, "logger": record.name, "msg": msg}
        out.update(keys)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == JSON:
        return JsonFormatter()
    if fmt == TEXT:
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def configure(fmt: str = TEXT, level: str | int | None = None, stream: TextIO | None = None) -> None:
    """The root logger writes `fmt` lines to `stream` (stderr); called again, it switches the format.

    As `logging.basicConfig`, it leaves a root logger alone that has handlers of someone else's (pytest's
    capture, an embedding program)."""
    root = logging.getLogger()
    if level is not None:
        root.setLevel(level)
    ours = [h for h in root.handlers if getattr(h, "_kzt", False)]
    if not ours and root.handlers:
        return
    if not ours:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler._kzt = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        ours = [handler]
    ours[0].setFormatter(formatter(fmt))
