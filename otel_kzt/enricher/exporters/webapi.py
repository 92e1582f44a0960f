"""The metrics port's web view (`/`, its two static files) and JSON API (`/api/v1/summary`,
`/api/v1/savings`): bodies and content types, served by whatever HTTP server holds the port.

The page is three small static files shipped as package data (`web/`): no build step, no dependency, and
it reads only the two JSON documents, which are built from the same snapshot as `/metrics`.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any, Final

from otel_kzt.enricher.exporters.summary import summary
from otel_kzt.savings.jsonform import report_to_json
from otel_kzt.savings.model import Report
from otel_kzt.serving.pages import Page, PageRequest, Reply

Snapshot = Mapping[str, Mapping[tuple[str, ...], float]]

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
                 now: float, health: Sequence[Mapping[str, Any]] = ()) -> bytes:  # fmt: skip
    return _json(summary(snap, flow_labels, now, health=health))


def pages(
    snapshot: Callable[[], Snapshot],
    flow_labels: Sequence[str],
    report: Callable[[], Report],
    clock: Callable[[], float] = time.time,
    agents: Callable[[], Sequence[Mapping[str, Any]]] = tuple,
) -> dict[str, Page]:
    """The metrics port's pages for the web view and its API (EnricherService._pages adds them);
    `agents`: the agents' health (`AgentsHealth.health`)."""
    fresh = {"Cache-Control": "no-store"}

    def summary_page(_request: PageRequest) -> Reply:
        return Reply(200, summary_body(snapshot(), flow_labels, clock(), agents()), JSON, fresh)

    def savings_page(_request: PageRequest) -> Reply:
        return Reply(200, savings_body(report()), JSON, fresh)

    def static(path: str) -> Page:
        body, content_type = asset(path) or (b"", "")
        return lambda _request: Reply(200, body, content_type)

    return {SUMMARY_PATH: summary_page, SAVINGS_PATH: savings_page, **{p: static(p) for p in ASSETS}}
