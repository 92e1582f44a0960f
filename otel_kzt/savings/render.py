"""The savings report as terminal tables (rich): recommendations with evidence, Services, before/after.

Rich writes colours and box drawing on a terminal and plain text into a pipe or file; `render` returns
the text so that callers (the report command, the demo's final report, tests) decide where it goes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from otel_kzt.savings.model import Change, Recommendation, Report, ServiceSummary


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


def _evidence(rec: Recommendation) -> str:
    rows = [
        f"{e.direction.value} {e.client_zone}->{e.server_zone}: {human_bytes(e.bytes)} ({usd(e.usd)})"
        for e in rec.evidence[:6]
    ]
    more = f"; +{len(rec.evidence) - 6} more" if len(rec.evidence) > 6 else ""
    endpoints = f"\nready endpoints: {zones_text(rec.endpoints_by_zone)}" if rec.endpoints_by_zone else ""
    return "; ".join(rows) + more + endpoints


def recommendations_table(report: Report) -> Table:
    table = Table(
        title=f"Recommendations: {usd(report.usd_per_month)} / month",
        title_justify="left",
        expand=True,
        show_lines=True,
    )
    for name, kw in (
        ("recommendation", {}),
        ("for", {}),
        ("saves / month", {"justify": "right"}),
        ("kept local", {"justify": "right"}),
        ("what to do", {"ratio": 3}),
        ("evidence (window)", {"ratio": 2}),
    ):
        table.add_column(name, **kw)
    for rec in report.recommendations:
        target = f"{rec.namespace}/{rec.service or rec.workload}"
        table.add_row(
            rec.kind.value,
            target,
            Text(usd(rec.usd_per_month), style="bold green"),
            f"{human_bytes(rec.bytes_per_second)}/s",
            rec.action,
            _evidence(rec),
        )
    return table


def _change(change: Change | None) -> str:
    if change is None:
        return ""
    when = time.strftime("%H:%M:%S", time.localtime(change.at))
    b, a = change.before, change.after
    cut = f", {100 * (1 - a.bytes_per_second / b.bytes_per_second):.0f}% less" if b.bytes_per_second else ""
    zones = f"{','.join(change.zones_before) or '-'} -> {','.join(change.zones_after) or '-'}"
    return "\n".join([
        f"{when}: {change.routing_before} -> {change.routing_after} (endpoint zones {zones})",
        f"before {_period(b.bytes_per_second, b.usd_per_month, b.seconds)}",
        f"after  {_period(a.bytes_per_second, a.usd_per_month, a.seconds)}{cut}",
    ])  # fmt: skip


def _period(bytes_per_second: float, usd_per_month: float, seconds: float) -> str:
    return f"{human_bytes(bytes_per_second)}/s = {usd(usd_per_month)}/month over {_minutes(seconds)}"


def services_table(services: tuple[ServiceSummary, ...]) -> Table:
    table = Table(
        title="Services with billed traffic (window), before and after a change",
        title_justify="left",
        expand=True,
        show_lines=True,
    )
    for name, kw in (
        ("service", {}),
        ("routing", {}),
        ("ready endpoints", {}),
        ("billed", {"justify": "right"}),
        ("cost / month", {"justify": "right"}),
        ("last change: before / after", {"ratio": 2}),
        ("note", {"ratio": 2}),
    ):
        table.add_column(name, **kw)
    for s in services:
        table.add_row(
            f"{s.namespace}/{s.name}",
            s.routing,
            zones_text(s.endpoints_by_zone),
            f"{human_bytes(s.bytes_per_second)}/s",
            usd(s.usd_per_month),
            _change(s.change),
            s.note,
        )
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
