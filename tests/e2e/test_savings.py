"""Measure, recommend, apply, verify, on the demo's cluster (3 zones, real agents, kube-proxy's DNAT).

`shop/web` (one pod per zone) calls `shop/api` (endpoints in zones a and b) through its cluster IP.
Before the change kube-proxy spreads the calls over both endpoints; the enricher recommends the setting
the cluster accepts for `shop/api`; the test applies it as `kubectl patch` (and the EndpointSlice
controller, and kube-proxy) would; after it, web in a and b stay in their zone and web in c (no endpoint
there) still crosses. Checked against nftables ground truth counted at the senders:

- at two quiet moments (before and after the change) the Service's cross-zone bytes on /metrics, by
  direction, equal the truth: requests counted at the client's node after kube-proxy's DNAT (the pod
  itself only sees the cluster IP; truth.py), responses at the endpoint pod;
- the recommendation's estimate is within 10 % of the saving measured by the truth after the change;
- the enricher recorded the change, and the report shows the windows before and after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_kzt import schema
from otel_kzt.demo.runner import ClusterRun, RunConfig
from otel_kzt.demo.traffic import Engine
from otel_kzt.demo.workloads import WEB_PORT
from otel_kzt.savings.model import SECONDS_PER_MONTH, Kind, Report
from otel_kzt.savings.render import render
from otel_kzt.savings.sources import from_enricher
from tests.e2e import truth
from tests.e2e.conftest import GRPC_PORT, Slot

pytestmark = pytest.mark.kernel

WINDOW_S = 30.0
WARMUP_S = 5.0
QUIET_TIMEOUT_S = 40.0
TOLERANCE = 0.10
API = ("shop", "api")


class Truth:
    """The Service's cross-zone bytes by direction, from the nftables counters alone (truth.py): requests
    as the client's node counts them after kube-proxy's DNAT, responses as the endpoint pod sends them."""

    def __init__(self, run: ClusterRun) -> None:
        self.cluster = run.cluster
        spec = run.services[API]
        self.endpoints = {a: p.node.zone for p in spec.pods for a in (p.v4, p.v6)}
        web = [p for p in self.cluster.routed_pods() if p.namespace == "shop" and p.name.startswith("web-")]
        self.clients = {a: p.node.zone for p in web for a in (p.v4, p.v6)}
        assert len(web) == 3 and len(spec.pods) == 2
        truth.install(self.cluster)

    def read(self, *, quiet: bool = False) -> dict[str, int]:
        """`quiet` (no traffic): through `truth.read`, which also checks that what the pods sent to the
        cluster IP is what their nodes DNATed; under traffic the two are read at different moments."""
        if quiet:
            pairs = truth.read(self.cluster)
            sent = dnated = pairs
        else:
            points = truth.read_points(self.cluster)
            sent, dnated = points["sent"], points["svc"]
        to = sum(b for (src, dst, proto), b in dnated.items()
                 if proto == "tcp" and src in self.clients and dst in self.endpoints
                 and self.clients[src] != self.endpoints[dst])  # fmt: skip
        from_ = sum(b for (src, dst, proto), b in sent.items()
                    if proto == "tcp" and src in self.endpoints and dst in self.clients
                    and self.endpoints[src] != self.clients[dst])  # fmt: skip
        return {"to": to, "from": from_}


def _service_bytes(run: ClusterRun) -> dict[str, int]:
    """The Service's cross-zone bytes by direction, as /metrics has them."""
    out = {"to": 0, "from": 0}
    for family in text_string_to_metric_families(run.scrape()):
        for s in family.samples:
            if (s.name == f"{schema.PROM_SERVICE_TRAFFIC_BYTES}_total"
                    and (s.labels["service_namespace"], s.labels["service"]) == API
                    and s.labels[schema.prom_label(schema.TRAFFIC_CLASS)] == "cross-zone"):  # fmt: skip
                out[s.labels["direction"]] += int(s.value)
    return out


def _quiet_and_equal(run: ClusterRun, truth_: Truth) -> dict[str, int]:
    """With traffic stopped: poll until /metrics equals the truth; fail with both when it never does."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while True:
        want, got = truth_.read(quiet=True), _service_bytes(run)
        if want == got and want["from"] > 0:
            return want
        if time.monotonic() > deadline:
            pytest.fail(f"Service cross-zone bytes (truth, enricher): {want} != {got}")
        time.sleep(0.5)


def _phase(run: ClusterRun, truth_: Truth) -> tuple[float, Report]:
    """Steady calls for a warm-up and a full window; the truth's cross-zone rate over the window and the
    enricher's report at its end (read after one agent interval: what the agents still had to send)."""
    calls = tuple(c for c in run.story.calls if c.server == "shop/api")
    engine = Engine((), calls)
    engine.start()
    try:
        time.sleep(WARMUP_S)
        t0, s0 = time.monotonic(), sum(truth_.read().values())
        time.sleep(WINDOW_S)
        t1, s1 = time.monotonic(), sum(truth_.read().values())
        time.sleep(run.config.interval_s * 1.5)
        report = from_enricher(run.web_url)
    finally:
        engine.stop()
    assert engine.requests_ok > 0.8 * len(calls) * (WARMUP_S + WINDOW_S) / calls[0].period_s
    return (s1 - s0) / (t1 - t0), report


@pytest.fixture
def savings_run(slot: Slot, tmp_path: Path) -> Iterator[ClusterRun]:
    prefix, net_id, metrics_port = slot.demo
    cfg = RunConfig(prefix=prefix, net_id=net_id, zones=3, nodes_per_zone=2, interval_s=1.0,
                    grpc_port=GRPC_PORT, metrics_port=metrics_port, workdir=tmp_path,
                    enricher_args=("--savings-window", f"{WINDOW_S:.0f}s",
                                   "--no-flow-logs-stdout"))  # fmt: skip
    run = ClusterRun(cfg)
    listeners = Engine(tuple(x for x in run.story.listeners if x.port == WEB_PORT), ())
    try:
        run.start(traffic=False)
        listeners.start()
        yield run
    finally:
        listeners.stop()
        run.close()


def test_recommend_apply_verify(savings_run: ClusterRun) -> None:
    run = savings_run
    truth_ = Truth(run)

    before_rate, report = _phase(run, truth_)
    before = _quiet_and_equal(run, truth_)
    assert report.enabled and report.setting == "PreferSameZone", report.reason
    rec = next(r for r in report.recommendations if r.kind is Kind.PREFER_SAME_ZONE and
               (r.namespace, r.service) == API)  # fmt: skip
    spread = next(r for r in report.recommendations if r.kind is Kind.SPREAD_ENDPOINTS and
                  (r.namespace, r.service) == API)  # fmt: skip
    endpoint_zones = tuple(sorted(set(truth_.endpoints.values())))
    assert rec.zones == endpoint_zones and rec.setting == "PreferSameZone"
    assert spread.zones == tuple(sorted(set(truth_.clients.values()) - set(endpoint_zones)))
    usd_per_byte = rec.usd_per_month / (rec.bytes_per_second * SECONDS_PER_MONTH)

    changed_at = time.time()
    assert run.set_traffic_distribution(*API, rec.setting)
    deadline = time.monotonic() + 20
    while True:  # the file re-read and a savings step: the enricher notes the moment
        summary = next((s for s in from_enricher(run.web_url).services if (s.namespace, s.name) == API), None)
        if summary is not None and summary.change is not None and summary.routing == rec.setting:
            break
        assert time.monotonic() < deadline, "the enricher did not record the routing change"
        time.sleep(0.5)
    assert summary.change.at >= changed_at - 1 and summary.change.routing_before == schema.ROUTING_NONE

    after_rate, report_after = _phase(run, truth_)
    after = _quiet_and_equal(run, truth_)
    assert after["to"] > before["to"] and after["from"] > before["from"]  # zone c still crosses

    measured = before_rate - after_rate
    print(f"\nshop/api cross-zone bytes/s (truth): before {before_rate:.0f}, after {after_rate:.0f}; "
          f"saving measured {measured:.0f} B/s = ${measured * usd_per_byte * SECONDS_PER_MONTH:.4f}/month; "
          f"estimated {rec.bytes_per_second:.0f} B/s = ${rec.usd_per_month:.4f}/month; "
          f"spread-endpoints {spread.bytes_per_second:.0f} B/s; cumulative before {before}, after {after}")
    assert measured > 0
    assert abs(rec.bytes_per_second - measured) <= TOLERANCE * measured
    assert abs(rec.usd_per_month - measured * usd_per_byte * SECONDS_PER_MONTH) <= (
        TOLERANCE * measured * usd_per_byte * SECONDS_PER_MONTH)
    # What is left crossing is zone c's, which the spread-endpoints advice named before the change.
    assert abs(spread.bytes_per_second - after_rate) <= TOLERANCE * after_rate

    svc = next(s for s in report_after.services if (s.namespace, s.name) == API)
    assert svc.change is not None and svc.routing == rec.setting
    assert svc.change.before.bytes_per_second > svc.change.after.bytes_per_second > 0
    assert not any(r.kind is Kind.PREFER_SAME_ZONE and (r.namespace, r.service) == API
                   for r in report_after.recommendations)  # fmt: skip
    text = render(report_after, run.web_url, width=200)
    assert "before" in text and "after" in text and "none -> PreferSameZone" in text
