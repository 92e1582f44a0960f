"""The demo's viewing session: scrape the enricher each interval, draw, apply recommendations, report.

Everything shown comes from the enricher: `/metrics` (the talkers, the zone matrix, the classes) and
`/api/v1/savings` (recommendations and the before/after of a Service whose routing changed). Applying a
recommendation changes the story's Service the way `kubectl patch` would (runner.set_traffic_distribution);
the enricher then sees the change in its metadata and measures the after.
"""

from __future__ import annotations

import io
import logging
import threading
import time

from rich.console import Console

from otel_kzt.demo.live import Screen, interactive, savings, screen
from otel_kzt.demo.runner import ClusterRun
from otel_kzt.demo.view import Scrape, agents_reporting, frame, parse, render
from otel_kzt.errors import KztError
from otel_kzt.savings.model import Kind, Report
from otel_kzt.savings.render import render as render_report
from otel_kzt.savings.sources import SourceError, from_enricher

log = logging.getLogger(__name__)
HINT_KEYS = "press a to apply, q to quit"


def title(run: ClusterRun, started: float, duration: float | None, scrape: Scrape) -> str:
    c = run.cluster
    left = f", {max(0.0, duration - (time.monotonic() - started)):.0f}s left" if duration else ""
    # An agent is "reporting" when the enricher heard from it within three intervals.
    reporting = agents_reporting(scrape, time.time(), 3 * run.config.interval_s + 1.0)
    return (f"otel-kzt demo: {len(c.zones())} zones x {len(c.nodes) // len(c.zones())} nodes, "
            f"{len(c.pods)} pods, agents reporting {reporting}/{len(c.nodes)}, "
            f"up {time.monotonic() - started:.0f}s{left} (Ctrl-C to stop)")


def plain(renderable: object, width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(renderable)
    return out.getvalue().rstrip("\n")


class Viewer:
    """Draws the live view, keeps the first and last good scrape, applies recommendations when asked."""

    def __init__(self, run: ClusterRun, duration_s: float | None, top: int, *, live: bool,
                 apply_after_s: float | None = None) -> None:  # fmt: skip
        self.run, self.duration_s, self.top, self.live = run, duration_s, top, live
        self.apply_after_s = apply_after_s
        self.first = self.last = parse(run.scrape(), time.monotonic())
        self.report_seen: Report | None = None
        self.applied: list[str] = []
        self._redrawn = False  # a live screen is being redrawn in place
        self.notice = ""  # said on the live screen instead of in the log

    def scrape(self) -> Scrape:
        """A fresh scrape; a failed one (the enricher busy or restarting) keeps the last good one."""
        try:
            self.last = parse(self.run.scrape(), time.monotonic())
        except OSError as exc:
            enricher = self.run.enricher
            if enricher is None or enricher.poll() is not None:
                raise KztError(f"the enricher stopped; its log is in {self.run.workdir}") from exc
            log.warning("scrape failed, keeping the last one: url=%s error=%s", self.run.metrics_url, exc)
        return self.last

    def savings(self) -> Report | None:
        """The enricher's savings report (the last good one when it cannot be read now)."""
        try:
            self.report_seen = from_enricher(self.run.web_url, timeout_s=5.0)
        except SourceError as exc:
            log.debug("savings not read: %s", exc)
        return self.report_seen

    def apply(self, asked: bool = True) -> list[str]:
        """Apply every prefer-same-zone recommendation of the last report to the story's Services
        (`asked`: a key press, said in the log even when there is nothing to apply yet)."""
        report = self.savings()
        done = []
        for rec in report.recommendations if report is not None else ():
            if rec.kind is Kind.PREFER_SAME_ZONE and rec.setting and self.run.set_traffic_distribution(
                    rec.namespace, rec.service, rec.setting):
                done.append(f"{rec.namespace}/{rec.service}: {rec.setting}")
        if done:
            # On a live screen the view says it; a log line would tear the redrawn screen.
            log.log(logging.DEBUG if self._redrawn else logging.INFO, "applied recommendations: %s",
                    "; ".join(done))
        else:
            # Retried each interval once due: not at INFO; on a live screen the view says it.
            level = logging.INFO if asked and not self._redrawn else logging.DEBUG
            log.log(level, "no prefer-same-zone recommendation to apply yet")
            self.notice = "nothing to apply yet" if asked else self.notice
        self.applied += done
        return done

    def loop(self, stop: threading.Event) -> None:
        """Until `--duration` is over, `q`, or `stop` is set (a signal)."""
        started, duration = self.first.taken, self.duration_s
        prev = self.first
        with interactive() as (scr, keys):
            self._redrawn = scr.live_mode
            while duration is None or time.monotonic() - started < duration:
                wait = self.run.config.interval_s
                if duration is not None:
                    wait = min(wait, max(0.0, duration - (time.monotonic() - started)))
                key = keys.wait(wait, stop)
                if key in ("q", "Q") or stop.is_set():
                    return
                due = self.apply_after_s is not None and time.monotonic() - started >= self.apply_after_s
                asked = key in ("a", "A")
                if (asked or due) and self.apply(asked) and due:
                    self.apply_after_s = None  # done; until then it is tried again each interval
                cur = self.scrape()
                if self.live and cur is not prev:
                    self._draw(scr, prev, cur, title(self.run, started, duration, cur),
                               HINT_KEYS if keys.enabled else "--apply-recommendations applies them")
                prev = cur

    def _draw(self, scr: Screen, prev: Scrape, cur: Scrape, heading: str, hint: str) -> None:
        fr = frame(prev, cur, self.top)
        report = self.savings()
        applied = f"applied: {'; '.join(self.applied)}" if self.applied else hint
        if self.notice and not self.applied:
            applied = f"{self.notice}; {hint}"
        text = render(fr, self.run.metrics_url, heading) + "\n\n" + plain(savings(report, applied))
        scr.show(screen(fr, report, heading, self.run.metrics_url, applied), text)

    def report(self) -> str:
        first, last = self.first, self.last
        text = render(frame(first, last, self.top), self.run.metrics_url,
                      f"otel-kzt demo: final report over {last.taken - first.taken:.0f}s "
                      "(rates are averages over the whole run)")
        report = self.savings()
        if report is not None:
            text += "\n\n" + render_report(report, self.run.web_url).rstrip("\n")
        return text
