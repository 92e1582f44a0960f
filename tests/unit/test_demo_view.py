"""The demo's view: rates, cost shares, zone matrix and class totals from two /metrics scrapes."""

from __future__ import annotations

import pytest

from otel_kzt.demo.view import SECONDS_PER_MONTH, agents_reporting, frame, human_bytes, parse, render


def _flow(src: str, dst: str, cls: str, value: float, zones: tuple[str, str] = ("a", "b")) -> str:
    return (f'kzt_flow_bytes_total{{source_k8s_namespace_name="shop",source_k8s_workload_kind="Deployment",'
            f'source_k8s_workload_name="{src}",destination_k8s_namespace_name="shop",'
            f'destination_k8s_workload_kind="Deployment",destination_k8s_workload_name="{dst}",'
            f'source_cloud_availability_zone="{zones[0]}",destination_cloud_availability_zone="{zones[1]}",'
            f'kzt_traffic_class="{cls}"}} {value}\n')


def _scrape(api_web: float, api_db: float, same: float, cost: float, zone_ab: float) -> str:
    return ("# TYPE kzt_flow_bytes counter\n"
            + _flow("api", "web", "cross-zone", api_web)
            + _flow("api", "postgres", "cross-zone", api_db)
            + _flow("api", "web", "same-zone", same, ("a", "a"))
            + "# TYPE kzt_zone_traffic_bytes counter\n"
            + f'kzt_zone_traffic_bytes_total{{source_cloud_availability_zone="a",'
              f'destination_cloud_availability_zone="b"}} {zone_ab}\n'
            + "# TYPE kzt_estimated_cost_usd counter\n"
            + f'kzt_estimated_cost_usd_total{{source_k8s_namespace_name="shop",source_k8s_workload_kind='
              f'"Deployment",source_k8s_workload_name="api",kzt_traffic_class="cross-zone"}} {cost}\n')


def test_rates_and_cost_shares() -> None:
    prev = parse(_scrape(1000, 0, 500, 0.0, 1000), taken=10.0)
    cur = parse(_scrape(4000, 1000, 900, 0.004, 5000), taken=12.0)
    fr = frame(prev, cur)
    assert [(t.source, t.destination) for t in fr.talkers] == [("shop/api", "shop/web"),
                                                             ("shop/api", "shop/postgres")]
    web, db = fr.talkers
    assert web.bytes_per_s == pytest.approx(1500) and web.total_bytes == 4000
    assert db.bytes_per_s == pytest.approx(500)
    # api's cross-zone cost rate is 0.002 $/s, split 3:1 between its two destinations.
    assert web.usd_per_month == pytest.approx(0.002 * 0.75 * SECONDS_PER_MONTH)
    assert db.usd_per_month == pytest.approx(0.002 * 0.25 * SECONDS_PER_MONTH)
    assert fr.zone_rates == {("a", "b"): pytest.approx(2000)}
    assert fr.class_totals == {"cross-zone": 5000, "same-zone": 900}
    assert fr.class_rates["same-zone"] == pytest.approx(200)
    assert fr.usd_per_month == pytest.approx(0.002 * SECONDS_PER_MONTH)


def test_counter_reset_counts_from_zero() -> None:
    prev = parse(_scrape(9000, 0, 0, 0.0, 0), taken=0.0)
    cur = parse(_scrape(300, 0, 0, 0.0, 0), taken=1.0)  # the enricher restarted
    assert frame(prev, cur).talkers[0].bytes_per_s == pytest.approx(300)


def test_render_names_the_way_to_look_next() -> None:
    prev = parse(_scrape(0, 0, 0, 0.0, 0), taken=0.0)
    cur = parse(_scrape(2_000_000, 0, 0, 1.0, 2_000_000), taken=1.0)
    text = render(frame(prev, cur), "http://127.0.0.1:9464/metrics", "title")
    assert "shop/api" in text and "shop/web" in text and "2.0 MB/s" in text
    assert "http://127.0.0.1:9464/metrics" in text
    assert 'rate(kzt_flow_bytes_total{kzt_traffic_class="cross-zone"}[1m])' in text
    assert "no cross-zone traffic reported yet" in render(frame(prev, prev), "u", "t")
    nothing = parse("", taken=0.0)
    assert "no zone traffic yet" in render(frame(nothing, nothing), "u", "t")


@pytest.mark.parametrize(("value", "text"), [(0, "0 B"), (999, "999 B"), (1500, "1.5 kB"),
                                             (2.5e9, "2.5 GB"), (7e15, "7000.0 TB")])
def test_human_bytes(value: float, text: str) -> None:
    assert human_bytes(value) == text


def test_agents_reporting_counts_recent_reports_only() -> None:
    text = ("# TYPE kzt_enricher_agent_last_report_timestamp_seconds gauge\n"
            'kzt_enricher_agent_last_report_timestamp_seconds{k8s_node_name="a"} 1000.0\n'
            'kzt_enricher_agent_last_report_timestamp_seconds{k8s_node_name="b"} 995.0\n'
            'kzt_enricher_agent_last_report_timestamp_seconds{k8s_node_name="c"} 900.0\n')
    assert agents_reporting(parse(text, 0.0), now_unix=1001.0, max_age_s=7.0) == 2
    assert agents_reporting(parse("", 0.0), now_unix=1001.0, max_age_s=7.0) == 0
