"""The rules of DESIGN §7 on small hand-made inputs: which recommendation, its saving, its evidence."""

from __future__ import annotations

import pytest

from otel_kzt import schema
from otel_kzt.k8s.servicemodel import ClusterVersion
from otel_kzt.savings.model import SECONDS_PER_MONTH, Direction, Flow, Kind, ServiceState, Workload
from otel_kzt.savings.recommend import HEADLESS_NOTE, NO_ENDPOINTS_NOTE, recommend
from otel_kzt.savings.version import CURRENT, setting_for, version_note

WEB = Workload("shop", "Deployment", "web")
API = Workload("shop", "Deployment", "api")
PROM = Workload("monitoring", "StatefulSet", "prometheus-k8s")
SVC = ("shop", "api")
WINDOW = 100.0


def _svc(routing: str = schema.ROUTING_NONE, zones: dict[str, int] | None = None) -> ServiceState:
    return ServiceState("shop", "api", "ClusterIP", routing, zones if zones is not None else {"a": 1, "b": 1})


def _flow(cz: str, sz: str, direction: Direction, nbytes: float, *, client: Workload = WEB,
          server: Workload = API, service: tuple[str, str] | None = SVC) -> Flow:
    return Flow(client, cz, server, sz, service, direction, nbytes, nbytes * 1e-9)


def _web_flows() -> list[Flow]:
    """web in a, b, c calls api (endpoints in a and b) through its Service, unrouted."""
    return [
        _flow("a", "b", Direction.TO, 100), _flow("a", "b", Direction.FROM, 2000),
        _flow("b", "a", Direction.TO, 50), _flow("b", "a", Direction.FROM, 1000),
        _flow("c", "a", Direction.TO, 70), _flow("c", "a", Direction.FROM, 1400),
        _flow("c", "b", Direction.FROM, 600),
    ]  # fmt: skip


@pytest.mark.parametrize(("version", "setting"), [
    ((1, 35), "PreferSameZone"), ((1, 34), "PreferSameZone"), ((1, 33), "PreferClose"),
    ((1, 31), "PreferClose"), ((1, 30), "topology-mode: Auto"), ((1, 27), "topology-mode: Auto"),
    ((1, 26), "topology-aware-hints: auto"), ((2, 0), "PreferSameZone"),
])  # fmt: skip
def test_setting_the_version_accepts(version: tuple[int, int], setting: str) -> None:
    assert setting_for(ClusterVersion(*version, f"v{version[0]}.{version[1]}.3")).name == setting


def test_unknown_version_gets_the_current_setting() -> None:
    assert setting_for(None) is CURRENT and CURRENT.name == "PreferSameZone"
    assert "unknown" in version_note(None) and "1.33 accepts PreferClose" in version_note(
        ClusterVersion(1, 33, "v1.33.1"))


def test_kubectl_commands() -> None:
    assert CURRENT.kubectl("shop", "api") == (
        "kubectl -n shop patch service api -p '{\"spec\":{\"trafficDistribution\":\"PreferSameZone\"}}'"
    )
    old = setting_for(ClusterVersion(1, 29, "v1.29.0"))
    assert old.kubectl("shop", "api") == (
        "kubectl -n shop annotate service api service.kubernetes.io/topology-mode=Auto"
    )
    assert old.routing_label == "topology-aware" and CURRENT.routing_label == "PreferSameZone"


def test_unrouted_service_gets_prefer_same_zone_and_spread() -> None:
    recs, summaries = recommend({SVC: _svc()}, _web_flows(), WINDOW, CURRENT)
    by_kind = {r.kind: r for r in recs}
    assert set(by_kind) == {Kind.PREFER_SAME_ZONE, Kind.SPREAD_ENDPOINTS}
    same = by_kind[Kind.PREFER_SAME_ZONE]
    # Clients in a and b, where api has endpoints: both directions of their billed traffic.
    assert same.bytes_per_second == pytest.approx((100 + 2000 + 50 + 1000) / WINDOW)
    assert same.usd_per_month == pytest.approx(3150e-9 / WINDOW * SECONDS_PER_MONTH)
    assert same.setting == "PreferSameZone" and "kubectl -n shop patch service api" in same.action
    assert same.zones == ("a", "b") and same.endpoints_by_zone == {"a": 1, "b": 1}
    assert [(e.direction, e.client_zone, e.server_zone, e.bytes) for e in same.evidence] == [
        (Direction.FROM, "a", "b", 2000), (Direction.FROM, "b", "a", 1000),
        (Direction.TO, "a", "b", 100), (Direction.TO, "b", "a", 50),
    ]  # fmt: skip
    spread = by_kind[Kind.SPREAD_ENDPOINTS]
    assert spread.zones == ("c",) and spread.bytes_per_second == pytest.approx(2070 / WINDOW)
    assert "in c" in spread.action and "with PreferSameZone set" in spread.action
    assert recs[0] is same  # biggest saving first
    (summary,) = summaries
    assert summary.bytes_per_second == pytest.approx(5220 / WINDOW) and summary.note == ""


@pytest.mark.parametrize("routing", ["PreferSameZone", "PreferClose", "PreferSameNode", "topology-aware"])
def test_service_already_set_gets_no_prefer_same_zone(routing: str) -> None:
    recs, (summary,) = recommend({SVC: _svc(routing)}, _web_flows(), WINDOW, CURRENT)
    assert [r.kind for r in recs] == [Kind.SPREAD_ENDPOINTS]
    assert recs[0].setting == "" and "with" not in recs[0].action  # routing is there already
    assert summary.routing == routing and "already routed" in summary.note


def test_headless_service_gets_no_routing_recommendation_and_says_why() -> None:
    recs, (summary,) = recommend({SVC: _svc(schema.ROUTING_HEADLESS)}, _web_flows(), WINDOW, CURRENT)
    assert recs == [] and summary.note == HEADLESS_NOTE
    assert summary.usd_per_month > 0  # its billed traffic is still shown


def test_no_ready_endpoints() -> None:
    recs, (summary,) = recommend({SVC: _svc(zones={"a": 0})}, _web_flows(), WINDOW, CURRENT)
    assert recs == [] and summary.note == NO_ENDPOINTS_NOTE


def test_old_cluster_gets_the_annotation() -> None:
    recs, _ = recommend({SVC: _svc()}, _web_flows(), WINDOW, setting_for(ClusterVersion(1, 28, "v1.28.9")))
    same = next(r for r in recs if r.kind is Kind.PREFER_SAME_ZONE)
    assert same.setting == "topology-mode: Auto" and "annotate service api" in same.action


def test_service_gone_is_left_out() -> None:
    assert recommend({}, _web_flows(), WINDOW, CURRENT) == ([], [])


def test_zero_window_saves_nothing() -> None:
    recs, _ = recommend({SVC: _svc()}, _web_flows(), 0.0, CURRENT)
    assert all(r.usd_per_month == 0 for r in recs)


def _node(name: str) -> Workload:
    return Workload("", "Node", name)


def test_zone_local_scrape_of_every_node() -> None:
    nodes = {"a": _node("n-a"), "b": _node("n-b"), "c": _node("n-c")}
    flows = [
        _flow(cz, sz, d, 10 if d is Direction.TO else 500, client=PROM, server=node, service=None)
        for cz in "abc" for sz, node in nodes.items() if sz != cz for d in Direction
    ]  # fmt: skip
    recs, summaries = recommend({}, flows, WINDOW, CURRENT)
    (rec,) = recs
    assert rec.kind is Kind.ZONE_LOCAL_SCRAPE and (rec.namespace, rec.workload, rec.service) == (
        "monitoring", "prometheus-k8s", "")
    assert rec.bytes_per_second == pytest.approx(6 * 510 / WINDOW) and rec.zones == ("a", "b", "c")
    assert "every node" in rec.action and summaries == []


def test_scraping_only_some_zones_is_no_zone_local_scrape() -> None:
    # Replicas in a and b, each reaching only zone c: not "every replica pulls from every zone".
    flows = [_flow("a", "c", Direction.FROM, 500, client=PROM, server=_node("n-c"), service=None),
             _flow("b", "c", Direction.FROM, 500, client=PROM, server=_node("n-c"), service=None),
             _flow("a", "b", Direction.FROM, 500, client=PROM, server=_node("n-b"), service=None)]
    assert recommend({}, flows, WINDOW, CURRENT) == ([], [])


def test_single_zone_client_is_no_zone_local_scrape() -> None:
    flows = [_flow("a", z, Direction.FROM, 500, client=PROM, server=_node(f"n-{z}"), service=None)
             for z in "bc"]
    assert recommend({}, flows, WINDOW, CURRENT) == ([], [])


def test_deployment_reached_through_its_service_is_a_service_matter() -> None:
    # web pulls api in every zone, but through api's Service: routing fixes it, not sharding.
    flows = [_flow("a", "b", Direction.FROM, 100), _flow("b", "a", Direction.FROM, 100)]
    recs, _ = recommend({SVC: _svc()}, flows, WINDOW, CURRENT)
    assert [r.kind for r in recs] == [Kind.PREFER_SAME_ZONE]
    direct = [_flow("a", "b", Direction.FROM, 100, service=None), _flow("b", "a", Direction.FROM, 100,
                                                                        service=None)]
    recs, _ = recommend({}, direct, WINDOW, CURRENT)
    assert [(r.kind, r.workload) for r in recs] == [(Kind.ZONE_LOCAL_SCRAPE, "web")]
