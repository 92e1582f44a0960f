"""Service attribution in the enricher: which Service each end is an endpoint of, and the keys it feeds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from otel_kzt import schema
from otel_kzt.enricher.exporters.prometheus import Aggregates
from otel_kzt.enricher.processing.resolution import Resolved, Resolver
from otel_kzt.enricher.processing.services import billed_flow_key, service_keys, service_targets
from otel_kzt.k8s.model import Endpoint, NodeInfo
from otel_kzt.k8s.servicemodel import ClusterVersion, ServiceRef, ServiceView
from otel_kzt.savings.model import Direction, Workload, flow_key
from otel_kzt.schema import TrafficClass, WorkloadKind

NODES = {
    "n-a": NodeInfo("n-a", "zone-a", "r", "aws", ("192.168.0.1",)),
    "n-b": NodeInfo("n-b", "zone-b", "r", "aws", ("192.168.0.2",)),
}
PODS = {
    "10.0.0.1": Endpoint("n-a", WorkloadKind.DEPLOYMENT, "web", "web-1", "shop", "u1"),
    "10.0.0.2": Endpoint("n-b", WorkloadKind.DEPLOYMENT, "api", "api-1", "shop", "u2"),
}
API = ServiceRef("shop", "api")
API_VIP = "10.96.0.20"


class FakeCatalog:
    """A ServiceCatalog over (address, target port, protocol) -> Services."""

    def __init__(self) -> None:
        self.listed: dict[tuple[str, int, str], tuple[ServiceRef, ...]] = {("10.0.0.2", 8080, "tcp"): (API,)}
        self.vips = {API_VIP: API}
        self.up = True
        self.generation = 1

    def available(self) -> bool:
        return self.up

    def services_at(self, address: str, port: int, protocol: str, at_unix_s: float | None = None
                    ) -> tuple[ServiceRef, ...]:  # fmt: skip
        return self.listed.get((address, port, protocol.lower()), ()) if self.up else ()

    def service_at(self, address: str, port: int, protocol: str, at_unix_s: float | None = None
                   ) -> ServiceRef | None:  # fmt: skip
        found = self.services_at(address, port, protocol, at_unix_s)
        return found[0] if found else None

    def service_of_vip(self, address: str) -> ServiceRef | None:
        return self.vips.get(address) if self.up else None

    def services(self) -> tuple[ServiceView, ...]:
        return ()

    def service(self, ref: ServiceRef) -> ServiceView | None:
        return None

    def cluster_version(self) -> ClusterVersion | None:
        return None


class Index:
    def __init__(self) -> None:
        self.services = FakeCatalog()
        self.generation = 1

    def ready(self) -> bool:
        return True

    def lookup(self, address: str, at_unix_s: float | None = None) -> Endpoint | None:
        return PODS.get(address)

    def node(self, name: str) -> NodeInfo | None:
        return NODES.get(name)


def _given(src: str, dst: str, sport: str = "", dport: str = "") -> dict[str, str]:
    out = {schema.SOURCE_ADDRESS: src, schema.DESTINATION_ADDRESS: dst, schema.NETWORK_TRANSPORT: "tcp"}
    if sport:
        out[schema.SOURCE_PORT] = sport
    if dport:
        out[schema.DESTINATION_PORT] = dport
    return out


def test_request_to_an_endpoint_names_the_service_on_the_wire() -> None:
    index = Index()
    resolved = Resolver(index).resolve(_given("10.0.0.1", "10.0.0.2", dport="8080"), True)  # type: ignore[arg-type]
    assert resolved.services == (API, None)
    assert resolved.attrs[schema.DESTINATION_SERVICE_NAME] == "api"
    assert resolved.attrs[schema.DESTINATION_SERVICE_NAMESPACE] == "shop"
    assert service_keys(resolved.attrs, resolved.traffic_class, resolved.services) == [
        ("shop", "api", "to", "shop", "Deployment", "web", "cross-zone")]
    assert billed_flow_key(resolved.attrs, resolved.traffic_class, resolved.services) == flow_key(
        Workload("shop", "Deployment", "web"), "zone-a", Workload("shop", "Deployment", "api"), "zone-b",
        service=("shop", "api"), direction=Direction.TO)


def test_response_from_an_endpoint_counts_for_the_service_but_adds_no_wire_attribute() -> None:
    resolved = Resolver(Index()).resolve(_given("10.0.0.2", "10.0.0.1", sport="8080"), True)  # type: ignore[arg-type]
    assert resolved.services == (None, API)
    assert schema.DESTINATION_SERVICE_NAME not in resolved.attrs
    assert service_keys(resolved.attrs, resolved.traffic_class, resolved.services) == [
        ("shop", "api", "from", "shop", "Deployment", "web", "cross-zone")]
    # Client and server stay who they are: web (zone-a) is the client of api (zone-b).
    key = billed_flow_key(resolved.attrs, resolved.traffic_class, resolved.services)
    web, api = Workload("shop", "Deployment", "web"), Workload("shop", "Deployment", "api")
    assert key == flow_key(web, "zone-a", api, "zone-b", service=("shop", "api"), direction=Direction.FROM)


def test_the_service_port_is_not_the_endpoint_port() -> None:
    resolved = Resolver(Index()).resolve(_given("10.0.0.1", "10.0.0.2", dport="80"), True)  # type: ignore[arg-type]
    assert resolved.services == (None, None) and schema.DESTINATION_SERVICE_NAME not in resolved.attrs
    # Not a Service's endpoint, still a billed client -> server flow for the savings (no Service).
    key = billed_flow_key(resolved.attrs, resolved.traffic_class, resolved.services)
    assert key is not None and key[8:] == ("", "", "to")


def test_services_unavailable_attribute_nothing() -> None:
    index = Index()
    index.services.up = False
    resolved = Resolver(index).resolve(_given("10.0.0.1", "10.0.0.2", dport="8080"), True)  # type: ignore[arg-type]
    assert resolved.services == (None, None)


def test_recheck_sees_a_service_change() -> None:
    index = Index()
    resolver = Resolver(index)  # type: ignore[arg-type]
    resolved = resolver.resolve(_given("10.0.0.1", "10.0.0.2", dport="8080"), True).slim()
    assert resolver.recheck(resolved, True) is resolved
    index.services.listed[("10.0.0.2", 8080, "tcp")] = (ServiceRef("shop", "api-canary"), API)
    assert resolver.recheck(resolved, True) is resolved  # answers are cached per catalog generation
    index.services.generation += 1  # what the catalog does on every change
    assert resolver.recheck(resolved, True) is None


def test_a_request_to_a_service_vip_is_named_by_the_service_and_classed_unknown() -> None:
    """What a socket addressed before kube-proxy's DNAT (cgroup mode): the Service is known, the zone of
    the backend it reaches is not. Never external: it is not priced as internet egress."""
    index = Index()
    resolved = Resolver(index).resolve(_given("10.0.0.1", API_VIP, dport="80"), True)  # type: ignore[arg-type]
    assert resolved.services == (API, None) and resolved.traffic_class is TrafficClass.UNKNOWN
    attrs = resolved.attrs
    assert attrs[schema.DESTINATION_SERVICE_NAMESPACE] == "shop"
    assert attrs[schema.DESTINATION_SERVICE_NAME] == "api"
    assert schema.DESTINATION_POD_NAME not in attrs and schema.DESTINATION_ZONE not in attrs
    assert service_keys(resolved.attrs, resolved.traffic_class, resolved.services) == [
        ("shop", "api", "to", "shop", "Deployment", "web", "unknown")]
    assert billed_flow_key(resolved.attrs, resolved.traffic_class, resolved.services) is None
    resolver = Resolver(index)  # type: ignore[arg-type]
    slim = resolver.resolve(_given("10.0.0.1", API_VIP, dport="80"), True).slim()
    index.services.vips.clear()  # the Service was deleted: its address means nothing now
    index.services.generation += 1
    assert resolver.recheck(slim, True) is None
    gone = resolver.resolve(_given("10.0.0.1", API_VIP, dport="80"), True)
    assert gone.traffic_class is TrafficClass.EXTERNAL and gone.services == (None, None)


def test_free_and_portless_flows_are_not_billed_flows() -> None:
    attrs = {schema.SOURCE_ZONE: "a", schema.DESTINATION_ZONE: "a", schema.DESTINATION_PORT: "80"}
    assert billed_flow_key(attrs, TrafficClass.SAME_ZONE, (None, None)) is None
    portless = {schema.SOURCE_ZONE: "a", schema.DESTINATION_ZONE: "b"}
    assert billed_flow_key(portless, TrafficClass.CROSS_ZONE, (None, None)) is None
    no_zone = {schema.SOURCE_ZONE: "a", schema.DESTINATION_PORT: "80"}
    assert billed_flow_key(no_zone, TrafficClass.CROSS_REGION, (None, None)) is None


def _targets_as_made_whole(agg: Aggregates, metric: str, resolved: Resolved, usd: float) -> list[object]:
    """Aggregates.targets' answer computed afresh, step by step (what its shared sets must equal)."""
    attrs, cls = resolved.attrs, resolved.traffic_class
    labels = tuple(attrs.get(k, "") for k in agg.flow_labels)
    if metric == schema.FLOW_PACKETS:
        return [(id(agg.flow_packets), labels, 1.0)]
    out: list[object] = [(id(agg.flow_bytes), labels, 1.0)]
    if attrs.get(schema.SOURCE_ZONE) and attrs.get(schema.DESTINATION_ZONE):
        out.append((id(agg.zone_bytes), (attrs[schema.SOURCE_ZONE], attrs[schema.DESTINATION_ZONE]), 1.0))
    pod, namespace = attrs.get(schema.SOURCE_POD_NAME), attrs.get(schema.SOURCE_NAMESPACE_NAME)
    if cls in (TrafficClass.CROSS_ZONE, TrafficClass.CROSS_REGION) and pod and namespace:
        out.append((id(agg.pod_cross_zone), (namespace, pod), 1.0))
    if cls in schema.BILLED_CLASSES and usd > 0:
        workload = (schema.SOURCE_NAMESPACE_NAME, schema.SOURCE_WORKLOAD_KIND, schema.SOURCE_WORKLOAD_NAME)
        cost_key = (*(attrs.get(k, "") for k in workload), cls.value)
        out.append((id(agg.cost), cost_key, usd))
    out += [(id(d), k, f) for d, k, f in service_targets(agg, attrs, cls, resolved.services, usd)]
    return out


_KEYS = [
    schema.SOURCE_ZONE, schema.DESTINATION_ZONE, schema.SOURCE_POD_NAME, schema.SOURCE_NAMESPACE_NAME,
    schema.SOURCE_WORKLOAD_KIND, schema.SOURCE_WORKLOAD_NAME, schema.DESTINATION_NAMESPACE_NAME,
    schema.DESTINATION_WORKLOAD_KIND, schema.DESTINATION_WORKLOAD_NAME, schema.DESTINATION_PORT,
    schema.SOURCE_PORT, schema.TRAFFIC_CLASS, schema.DESTINATION_POD_NAME,
]  # fmt: skip
_values = st.sampled_from(["", "a", "b", None])  # None: the attribute left out
_rarely = st.sampled_from([False] * 5 + [True])
_series = st.tuples(
    st.sampled_from([schema.FLOW_BYTES, schema.FLOW_BYTES, schema.FLOW_PACKETS]),
    st.dictionaries(st.sampled_from(_KEYS), _values, max_size=2),  # what it changes of the first's
    _rarely,  # same-zone instead of the example's class
    _rarely,  # retain() before it: the shared sets start afresh
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.fixed_dictionaries({k: _values for k in _KEYS}),
    st.tuples(
        st.sampled_from([TrafficClass.CROSS_ZONE, TrafficClass.CROSS_REGION, TrafficClass.EXTERNAL]),
        st.tuples(st.sampled_from([None, API]), st.sampled_from([None, ServiceRef("shop", "web")])),
        st.sampled_from([0.0, 1e-11]),  # USD per byte
    ),
    st.lists(_series, min_size=1, max_size=40),
    st.sampled_from([schema.DEFAULT_FLOW_AGGREGATION, (schema.TRAFFIC_CLASS,), (schema.DESTINATION_PORT,)]),
)
def test_series_targets_equal_their_sets_made_whole(
    first: dict[str, str | None],
    naming: tuple[TrafficClass, tuple[ServiceRef | None, ServiceRef | None], float],
    series: list[tuple[str, dict[str, str | None], bool, bool]],
    flow_labels: tuple[str, ...],
) -> None:
    """Targets are shared between series by what they read: each set equals the one made from its own
    attributes, whichever (nearly alike) series made it first, and across the pruning (retain) that
    empties the sharing, whatever the flow labels."""
    agg = Aggregates(flow_labels)
    cls, refs, usd = naming
    for metric, changes, same_zone, prune in series:
        if prune:
            agg.retain([], 0.0, 60.0)
        attrs = {k: v for k, v in {**first, **changes}.items() if v is not None}
        resolved = Resolved(b"", attrs, TrafficClass.SAME_ZONE if same_zone else cls, "aws", services=refs)
        made = agg.targets(metric, resolved, usd)
        assert [(id(d), k, f) for d, k, f in made] == _targets_as_made_whole(agg, metric, resolved, usd)
