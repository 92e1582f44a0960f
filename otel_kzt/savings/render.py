"""The savings report as terminal tables (rich): recommendations with evidence, Services, before/after.

Rich writes colours and box drawing on a terminal and plain text into a pipe or file; `render` returns
the text so that callers (the report command, the demo's final report, tests) decide where it goes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from otel_kzt.savings.model import Change, Period, Recommendation, Report, ServiceSummary

PLAIN_WIDTH = 160  # into a pipe or a file


def human_bytes(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def usd(value: float) -> str:
    return f"${value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"${value:.2g}"


def zones_text(by_zone: Mapping[str, int]) -> str:
    return ", ".join(f"{z or '(no zone)'}: {n}" for z, n in sorted(by_zone.items())) or "none"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def header(report: Report, source: str) -> Text:
    text = Text(f"otel-kzt savings report from {source}\n", style="bold")
    if not report.enabled:
        text.append(f"savings are off: {report.reason}\n", style="bold red")
        return text
    version = report.kubernetes_version or "unknown version"
    text.append(
        f"window {_minutes(report.window_seconds)} (seen: {_minutes(report.covered_seconds)}), "
        f"a month being 730 hours; Kubernetes {version}: recommending {report.setting}\n"
    )
    return text


EVIDENCE_ROWS = 4  # the biggest zone pairs; --output json has them all


def _evidence(rec: Recommendation) -> str:
    rows = [f"{e.direction.value} {e.client_zone} -> {e.server_zone}: {human_bytes(e.bytes)}"
            for e in rec.evidence[:EVIDENCE_ROWS]]
    if len(rec.evidence) > EVIDENCE_ROWS:
        rows.append(f"(+{len(rec.evidence) - EVIDENCE_ROWS} more zone pairs)")
    if rec.endpoints_by_zone:
        rows.append(f"ready endpoints: {zones_text(rec.endpoints_by_zone)}")
    return "\n".join(rows)


def _table(title: str, columns: tuple[tuple[str, dict[str, Any]], ...]) -> Table:
    table = Table(title=title, title_justify="left", expand=True, show_lines=True)
    for name, kw in columns:
        table.add_column(name, **kw)
    return table


_RIGHT: Final[dict[str, Any]] = {"justify": "right", "no_wrap": True}


def recommendations_table(report: Report) -> Table:
    table = _table(f"Recommendations: {usd(report.usd_per_month)} / month", (
        ("recommendation", {"no_wrap": True}), ("for", {}), ("saves / month", _RIGHT), ("kept local", _RIGHT),
        ("what to do", {"ratio": 3}), ("evidence (window)", {"ratio": 2}),
    ))  # fmt: skip
    for rec in report.recommendations:
        saves = Text(usd(rec.usd_per_month), style="bold green")
        table.add_row(rec.kind.value, f"{rec.namespace}/{rec.service or rec.workload}", saves,
                      f"{human_bytes(rec.bytes_per_second)}/s", rec.action, _evidence(rec))  # fmt: skip
    return table


def _period(p: Period) -> str:
    return f"{human_bytes(p.bytes_per_second)}/s\n{usd(p.usd_per_month)}/month\nover {_minutes(p.seconds)}"


def _change_cells(change: Change | None) -> tuple[str, str, str]:
    """(what changed and when, the before period, the after period)."""
    if change is None:
        return ("", "", "")
    when = time.strftime("%H:%M:%S", time.localtime(change.at))
    zones = f"{','.join(change.zones_before) or '-'} -> {','.join(change.zones_after) or '-'}"
    b, a = change.before, change.after
    cut = f"\n{100 * (1 - a.bytes_per_second / b.bytes_per_second):.0f}% less" if b.bytes_per_second else ""
    what = f"{when}: {change.routing_before} -> {change.routing_after}\nendpoint zones: {zones}"
    return (what, _period(b), _period(a) + cut)


def services_table(services: tuple[ServiceSummary, ...]) -> Table:
    table = _table("Services with billed traffic (window); before and after their last change", (
        ("service", {}), ("routing", {}), ("ready endpoints", {}), ("billed", _RIGHT),
        ("last change", {"ratio": 2}), ("before", _RIGHT), ("after", _RIGHT), ("note", {"ratio": 3}),
    ))  # fmt: skip
    for s in services:
        endpoints = "\n".join(f"{z or '(no zone)'}: {n}" for z, n in sorted(s.endpoints_by_zone.items()))
        billed = f"{human_bytes(s.bytes_per_second)}/s\n{usd(s.usd_per_month)}/month"
        table.add_row(f"{s.namespace}/{s.name}", s.routing, endpoints or "none", billed,
                      *_change_cells(s.change), s.note)  # fmt: skip
    return table


def renderable(report: Report, source: str) -> RenderableType:
    parts: list[RenderableType] = [header(report, source)]
    if report.enabled:
        if report.recommendations:
            parts.append(recommendations_table(report))
        else:
            parts.append(
                Text("nothing to recommend: no billed traffic a change would keep local in the window")
            )
        if report.services:
            parts.append(services_table(report.services))
    return Group(*parts)


def render(report: Report, source: str, *, width: int | None = None, color: bool = False) -> str:
    """The report as text (`color`: with terminal colour codes)."""
    out = io.StringIO()
    console = Console(
        file=out,
        width=width or 140,
        force_terminal=color,
        color_system="auto" if color else None,
        highlight=False,
        soft_wrap=False,
    )
    console.print(renderable(report, source))
    return out.getvalue()
