"""Where `otel-kzt report` reads a `Report` from: a running enricher, or a Prometheus holding its metrics.

Any failure to read (refused, timeout, HTTP error, not the layout expected) is a `SourceError` naming the
URL, which the command turns into exit status 1.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Final

from otel_kzt.errors import KztError
from otel_kzt.savings.jsonform import report_from_json
from otel_kzt.savings.model import Report

SAVINGS_PATH: Final = "/api/v1/savings"
SUMMARY_PATH: Final = "/api/v1/summary"
DEFAULT_TIMEOUT_S: Final = 10.0


class SourceError(KztError):
    """The report's source could not be read."""


def get_json(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise SourceError(f"cannot read {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"cannot read {url}: {reason}") from exc
    try:
        return json.loads(body)
    except ValueError as exc:
        raise SourceError(f"cannot read {url}: not JSON ({exc})") from exc


def from_enricher(base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Report:
    url = base_url.rstrip("/") + SAVINGS_PATH
    try:
        return report_from_json(get_json(url, timeout_s))
    except ValueError as exc:
        raise SourceError(f"cannot read {url}: {exc}") from exc
