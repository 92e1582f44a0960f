"""A metrics port (the enricher's :9464, the agent's :9465): GET pages (/metrics, /healthz, /readyz, and
whatever else is added).

A page is a plain function `PageRequest -> Reply`, run on one of this port's worker threads (never on the
event loop), so a page may take its locks and its time without stalling the other connections. Few workers:
a scrape storm queues here instead of taking the CPU from the receivers. Adding a page is one entry in the
mapping given to `MetricsPort` (see `EnricherService._pages`, `otel_kzt.agent.health`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from otel_kzt.serving.limits import HttpLimits
from otel_kzt.serving.server import AsyncHttpServer

TEXT: Final = "text/plain; charset=utf-8"
JSON: Final = "application/json"
PAGE_WORKERS: Final = 2


@dataclass(frozen=True)
class PageRequest:
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)


Page = Callable[[PageRequest], Reply]


class MetricsPort:
    """Start/stop wrapper of the metrics port's server; `pages` maps a path to its page."""

    def __init__(self, host: str, port: int, pages: Mapping[str, Page], limits: HttpLimits) -> None:
        self._pages = dict(pages)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = AsyncHttpServer(
            "metrics", app, host=host, port=port, limits=limits, workers=PAGE_WORKERS
        )

    def start(self) -> int:
        return self.server.start()

    def shutdown(self) -> None:
        self.server.shutdown()

    async def _handle(self, request: web.Request) -> web.Response:
        page = self._pages.get(request.path)
        if page is None:
            known = ", ".join(sorted(self._pages))
            return _response(Reply(404, f"not found ({known})\n".encode()))
        if request.method not in ("GET", "HEAD"):
            return _response(Reply(405, b"GET only\n", headers={"Allow": "GET, HEAD"}))
        # the headers as aiohttp holds them: case-insensitive (`Accept` or `accept`), read-only
        asked = PageRequest(request.path, dict(request.query), request.headers)
        return _response(await self.server.run_blocking(page, asked))


def _response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))
    response.headers["Content-Type"] = reply.content_type
    return response
