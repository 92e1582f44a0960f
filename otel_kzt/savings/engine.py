"""The savings state of a running enricher: fed every few seconds, it answers with the current `Report`.

`update` takes the Services as routed now (None while they cannot be read), the cumulative billed-flow
totals and the cluster's version; it records a snapshot, notes routing changes, and re-runs the rules over
the last window. The caller (the enricher) owns the threads and the locks; this holds only values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from otel_kzt.k8s.servicemodel import ClusterVersion
from otel_kzt.savings.history import ChangeLog, History, Totals, by_service
from otel_kzt.savings.model import Change, Period, Report, ServiceKey, ServiceState, ServiceSummary, flow_of
from otel_kzt.savings.recommend import recommend
from otel_kzt.savings.version import setting_for

STARTING = "no Services seen yet"


class Engine:
    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.history = History(window_s)
        self.changes = ChangeLog(window_s)
        self.report = Report(0.0, False, STARTING, window_s, 0.0, "", "")

    def update(
        self,
        now: float,
        services: Mapping[ServiceKey, ServiceState] | None,
        totals: Totals,
        version: ClusterVersion | None,
        reason: str = "",
    ) -> Report:
        """One step; `services` None (unreadable: `reason` says why) turns the savings off."""
        self.history.add(now, totals)
        start, end, deltas = self.history.window()
        covered = max(end - start, 0.0)
        if services is None:
            self.report = Report(now, False, reason or STARTING, self.window_s, covered, _text(version), "")
            return self.report
        before = {k: Period(start, end, b, u) for k, (b, u) in by_service(deltas).items()}
        self.changes.observe(now, services, by_service(totals), before)
        setting = setting_for(version)
        flows = [flow_of(k, b, u) for k, (b, u) in sorted(deltas.items())]
        recs, summaries = recommend(services, flows, covered, setting)
        self.report = Report(
            generated_at=now,
            enabled=True,
            reason="",
            window_seconds=self.window_s,
            covered_seconds=covered,
            kubernetes_version=_text(version),
            setting=setting.name,
            recommendations=tuple(recs),
            services=tuple(with_changes(summaries, services, self.changes.changes())),
        )
        return self.report


def with_changes(
    summaries: list[ServiceSummary],
    services: Mapping[ServiceKey, ServiceState],
    changes: Mapping[ServiceKey, Change],
) -> list[ServiceSummary]:
    """Each summary with its Service's last change, plus the changed Services that carry nothing now."""
    out = [dataclasses.replace(s, change=changes.get((s.namespace, s.name))) for s in summaries]
    seen = {(s.namespace, s.name) for s in summaries}
    for key in sorted(set(changes) - seen):
        state = services.get(key)
        if state is not None:
            out.append(
                ServiceSummary(
                    state.namespace,
                    state.name,
                    state.type,
                    state.routing,
                    dict(state.endpoints_by_zone),
                    0.0,
                    0.0,
                    change=changes[key],
                )
            )
    out.sort(key=lambda s: (s.namespace, s.name))
    return out


def _text(version: ClusterVersion | None) -> str:
    return version.git_version if version is not None else ""
