"""The demo's live terminal view: redrawn in place (rich), the zone matrix as a heat map, the savings panel.

On a terminal a `rich.live.Live` redraws one screen each interval and single keys act (`a` applies the
report's recommendations, `q` quits); anything else (a pipe, a file, a test) gets the plain frames of
`view.render`, one after the other. The numbers are the same either way: `view.frame` over two scrapes of
`/metrics`, and the enricher's `/api/v1/savings` for recommendations and before/after.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from types import TracebackType
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from otel_kzt.demo.view import Frame
from otel_kzt.savings.model import Report
from otel_kzt.savings.render import human_bytes, usd

STOP_POLL_S = 0.1  # how soon a key wait notices a stop signal
_HEAT_CROSS = (200, 40, 30)  # red: billed
_HEAT_LOCAL = (30, 140, 60)  # green: the diagonal, free


def _shade(rgb: tuple[int, int, int], level: float) -> str:
    """A background from near-black (0) to the full colour (1)."""
    level = max(0.0, min(1.0, level))
    r, g, b = (int(25 + (c - 25) * level) for c in rgb)
    return f"on rgb({r},{g},{b})"


def heat_map(zone_rates: dict[tuple[str, str], float]) -> RenderableType:
    zones = sorted({z for pair in zone_rates for z in pair if z})
    if not zones:
        return Text("  (no zone traffic yet)")
    top = max(zone_rates.values(), default=0.0) or 1.0
    table = Table(title="Zone x zone (bytes/s, source -> destination)", title_justify="left")
    table.add_column("from \\ to")
    for zone in zones:
        table.add_column(zone, justify="right")
    for src in zones:
        cells = []
        for dst in zones:
            rate = zone_rates.get((src, dst), 0.0)
            style = _shade(_HEAT_LOCAL if src == dst else _HEAT_CROSS, (rate / top) ** 0.5)
            cells.append(Text(f" {human_bytes(rate)}/s ", style=f"bold white {style}"))
        table.add_row(src, *cells)
    return table


def talkers(fr: Frame) -> RenderableType:
    table = Table(
        title=f"Top cross-zone talkers (rates over the last {fr.seconds:.1f}s)", title_justify="left"
    )
    for name, justify in (
        ("source workload", "left"),
        ("destination workload", "left"),
        ("rate", "right"),
        ("total", "right"),
        ("est. $/month", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for t in fr.talkers:
        table.add_row(
            t.source,
            t.destination,
            f"{human_bytes(t.bytes_per_s)}/s",
            human_bytes(t.total_bytes),
            f"{t.usd_per_month:,.2f}",
        )
    if not fr.talkers:
        table.add_row("(no cross-zone traffic reported yet)", "", "", "", "")
    return table


def classes(fr: Frame) -> RenderableType:
    table = Table(title="Per traffic class", title_justify="left")
    for name in ("class", "rate", "total"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for cls, total in sorted(fr.class_totals.items()):
        table.add_row(cls, f"{human_bytes(fr.class_rates.get(cls, 0.0))}/s", human_bytes(total))
    table.caption = f"estimated cost at this rate: ${fr.usd_per_month:,.2f} / month"
    return table


def savings(report: Report | None, hint: str) -> RenderableType:
    """Recommendations and, for a Service whose routing changed, its billed rate before and after."""
    if report is None:
        return Text("Savings: waiting for the enricher's first report", style="dim")
    if not report.enabled:
        return Text(f"Savings are off: {report.reason}", style="bold red")
    table = Table(
        title=f"Savings: {usd(report.usd_per_month)} / month to be had ({hint})", title_justify="left"
    )
    for name in ("recommendation", "for", "saves / month", "what to do"):
        table.add_column(name, justify="right" if name.startswith("saves") else "left")
    for rec in report.recommendations[:4]:
        table.add_row(
            rec.kind.value,
            f"{rec.namespace}/{rec.service or rec.workload}",
            Text(usd(rec.usd_per_month), style="bold green"),
            rec.action.split(": kubectl")[0],
        )
    parts: list[RenderableType] = [table]
    for svc in report.services:
        if svc.change is not None:
            b, a = svc.change.before, svc.change.after
            parts.append(
                Text(
                    f"{svc.namespace}/{svc.name} {svc.change.routing_before} -> "
                    f"{svc.change.routing_after}: billed "
                    f"{human_bytes(b.bytes_per_second)}/s = {usd(b.usd_per_month)}/month before, "
                    f"{human_bytes(a.bytes_per_second)}/s = {usd(a.usd_per_month)}/month after "
                    f"({a.seconds:.0f}s since the change)",
                    style="bold",
                )
            )
    return Group(*parts)


def screen(fr: Frame, report: Report | None, title: str, metrics_url: str, hint: str) -> RenderableType:
    web = metrics_url.removesuffix("metrics")
    links = Text(f"Metrics: {metrics_url}  Web view: {web}", style="dim")
    return Group(Text(title, style="bold"), talkers(fr), heat_map(fr.zone_rates), classes(fr),
                 savings(report, hint), links)  # fmt: skip


class Screen:
    """One live, redrawn screen on a terminal; plain frames appended otherwise."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.live_mode = self.out.isatty()
        self._live: Live | None = None

    def __enter__(self) -> Screen:
        if self.live_mode:
            self._live = Live(
                console=Console(file=self.out),
                auto_refresh=False,
                screen=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        return self

    def show(self, live: RenderableType, plain: str) -> None:
        if self._live is not None:
            self._live.update(live, refresh=True)
        else:
            self.out.write("\n" + plain + "\n")
            self.out.flush()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self._live is not None:
            self._live.stop()
            self._live = None


class Keys:
    """Single key presses from a terminal (cbreak mode, restored on the way out); none from anything else."""

    def __init__(self, active: bool, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdin
        self._active = active
        self._saved: list[object] | None = None
        self.enabled = False

    def __enter__(self) -> Keys:
        try:
            fd = self._stream.fileno()
            if self._active and os.isatty(fd):
                self._saved = termios.tcgetattr(fd)
                tty.setcbreak(fd)
                self.enabled = True
        except (OSError, ValueError, termios.error):
            self.enabled = False
        return self

    def wait(self, timeout_s: float, stop: threading.Event) -> str | None:
        """A key pressed within `timeout_s`, else None; returns early once `stop` is set (a signal only
        sets it: `otel_kzt.signals`), seen within `STOP_POLL_S` while a terminal is read."""
        if not self.enabled:
            stop.wait(max(0.0, timeout_s))
            return None
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._stream], [], [], max(0.0, min(left, STOP_POLL_S)))
            if ready:
                return os.read(self._stream.fileno(), 1).decode(errors="replace")
            if left <= STOP_POLL_S:
                return None
        return None

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self._stream.fileno(), termios.TCSADRAIN, self._saved)  # type: ignore[arg-type]
            self._saved = None


@contextlib.contextmanager
def interactive(out: TextIO | None = None) -> Iterator[tuple[Screen, Keys]]:
    with Screen(out) as scr, Keys(active=scr.live_mode) as keys:  # a pipe reads no keys
        yield scr, keys
