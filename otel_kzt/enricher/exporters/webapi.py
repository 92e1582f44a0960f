"""The metrics port's web view (`/`, its two static files) and JSON API (`/api/v1/summary`,
`/api/v1/savings`): bodies and content types, served by whatever HTTP server holds the port.

The page is three small static files shipped as package data (`web/`): no build step, no dependency, and
it reads only the two JSON documents, which are built from the same snapshot as `/metrics`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Final

from otel_kzt.enricher.exporters.summary import summary
from otel_kzt.savings.jsonform import report_to_json
from otel_kzt.savings.model import Report

HTML: Final = "text/html; charset=utf-8"
JAVASCRIPT: Final = "text/javascript; charset=utf-8"
CSS: Final = "text/css; charset=utf-8"
JSON: Final = "application/json"
SUMMARY_PATH: Final = "/api/v1/summary"
SAVINGS_PATH: Final = "/api/v1/savings"
ASSETS: Final[Mapping[str, tuple[str, str]]] = {
    "/": ("index.html", HTML),
    "/index.html": ("index.html", HTML),
    "/app.js": ("app.js", JAVASCRIPT),
    "/style.css": ("style.css", CSS),
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("otel_kzt.enricher.exporters").joinpath("web", name).read_bytes()


def asset(path: str) -> tuple[bytes, str] | None:
    """A static file of the web view by URL path, with its content type; None when there is none."""
    entry = ASSETS.get(path)
    return (_read(entry[0]), entry[1]) if entry is not None else None


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def savings_body(report: Report) -> bytes:
    return _json(report_to_json(report))


def summary_body(snap: Mapping[str, Mapping[tuple[str, ...], float]], flow_labels: Sequence[str],
                 now: float) -> bytes:  # fmt: skip
    return _json(summary(snap, flow_labels, now))
