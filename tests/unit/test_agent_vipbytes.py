"""`kzt_agent_service_vip_bytes_total`: the growth of flows to Service cluster IPs, interval by interval,
through evictions, restarts and Services that come and go; and the interval loop serving it."""

from __future__ import annotations

from otel_kzt import schema
from otel_kzt.agent.config import AgentConfig, OtlpConfig
from otel_kzt.agent.export import Exporter
from otel_kzt.agent.healthport import report_metrics
from otel_kzt.agent.local import LocalFlows
from otel_kzt.agent.service import AgentService
from otel_kzt.agent.vipbytes import ServiceVipBytes
from otel_kzt.k8s.servicemodel import ServiceRef
from tests.unit.test_agent_local import NODE, index, key
from tests.unit.test_agent_service import once
from tests.unit.test_agent_support import FakeMap, GrpcReceiver, points

VIP, VIP6, BACKEND = "10.96.0.20", "fd00:96::20", "10.0.2.7"
API = ServiceRef("shop", "api")
TO_VIP = key("10.0.1.5", VIP, dport=80)
TO_VIP6 = key("fd00:1::5", VIP6, dport=80)
TO_POD = key("10.0.1.5", BACKEND, dport=8080)
SEC = 10**9


class Catalog:
    def __init__(self) -> None:
        self.vips = {VIP: API, VIP6: API}
        self.generation = 1
        self.asked = 0

    def service_of_vip(self, address: str) -> ServiceRef | None:
        self.asked += 1
        return self.vips.get(address)


def test_the_growth_of_vip_flows_only() -> None:
    fake, catalog = FakeMap(), Catalog()
    vips = ServiceVipBytes(catalog, started_unix_ns=fake.now_ns - SEC)
    fake.add(TO_VIP, 1000, 2)
    fake.add(TO_VIP6, 300)
    fake.add(TO_POD, 5000, 5)  # netfilter and tc see this: after DNAT, no VIP
    assert vips.observe(fake.snapshot()) == 1300
    fake.add(TO_VIP, 500)
    assert vips.observe(fake.snapshot()) == 1800
    assert vips.observe(fake.snapshot()) == 1800  # nothing new: nothing added
    assert catalog.asked == 3  # once per destination and catalog generation


def test_an_evicted_flow_adds_its_last_bytes_and_the_next_one_counts_whole() -> None:
    fake, catalog = FakeMap(), Catalog()
    vips = ServiceVipBytes(catalog, started_unix_ns=fake.now_ns - SEC)
    fake.add(TO_VIP, 1000)
    assert vips.observe(fake.snapshot()) == 1000
    fake.race[TO_VIP] = (40, 1)  # arrived after the last read, before the eviction
    fake.evict([TO_VIP])
    fake.now_ns += 400 * SEC
    fake.add(TO_VIP, 70)  # the same key begins again
    assert vips.observe(fake.snapshot()) == 1000 + 40 + 70


def test_a_flow_begun_and_evicted_between_two_reads_counts_whole() -> None:
    """Seen only as an evicted final value: all of it was sent since the last read."""
    fake, catalog = FakeMap(), Catalog()
    vips = ServiceVipBytes(catalog, started_unix_ns=fake.now_ns - SEC)
    assert vips.observe(fake.snapshot()) == 0
    fake.add(TO_VIP, 700, 3)
    fake.add(TO_POD, 5000)
    fake.race[TO_VIP] = (30, 1)
    fake.evict([TO_VIP, TO_POD])
    assert vips.observe(fake.snapshot()) == 730  # the pod flow is no VIP flow
    assert vips.observe(fake.snapshot()) == 730  # reported once
    fake.add(TO_VIP, 5)  # the same key again, read this time
    assert vips.observe(fake.snapshot()) == 735


def test_an_evicted_flow_whose_service_was_listed_meanwhile_counts_whole() -> None:
    fake, catalog = FakeMap(), Catalog()
    catalog.vips = {}
    vips = ServiceVipBytes(catalog, started_unix_ns=fake.now_ns - SEC)
    fake.add(TO_VIP, 1000)
    assert vips.observe(fake.snapshot()) == 0  # not a VIP yet
    catalog.vips, catalog.generation = {VIP: API}, 2
    fake.evict([TO_VIP])
    assert vips.observe(fake.snapshot()) == 1000


def test_a_flow_of_the_previous_process_evicted_before_the_first_read_is_the_restart_gap() -> None:
    """Begun under the previous process, which reported it until its last read; what followed is in
    neither run (the documented restart gap), so nothing of it is counted here."""
    fake, catalog = FakeMap(), Catalog()
    fake.add(TO_VIP, 1000)
    vips = ServiceVipBytes(catalog, started_unix_ns=fake.now_ns + SEC)
    fake.evict([TO_VIP])
    assert vips.observe(fake.snapshot()) == 0


def test_a_flow_older_than_the_process_counts_from_its_first_read() -> None:
    """The previous agent process reported what it sent until then (its own run of the counter)."""
    fake, catalog = FakeMap(), Catalog()
    fake.add(TO_VIP, 1000)
    vips = ServiceVipBytes(catalog, started_unix_ns=fake.now_ns + SEC)
    assert vips.observe(fake.snapshot()) == 0
    fake.add(TO_VIP, 250)
    assert vips.observe(fake.snapshot()) == 250


def test_services_that_come_late_or_go_midway() -> None:
    fake, catalog = FakeMap(), Catalog()
    catalog.vips = {}  # not listed yet
    vips = ServiceVipBytes(catalog, started_unix_ns=fake.now_ns - SEC)
    fake.add(TO_VIP, 1000)
    assert vips.observe(fake.snapshot()) == 0
    catalog.vips, catalog.generation = {VIP: API}, 2  # listed: the flow sent since this process began
    assert vips.observe(fake.snapshot()) == 1000
    catalog.vips, catalog.generation = {}, 3  # deleted while the connection lasts: still a VIP flow
    fake.add(TO_VIP, 10)
    assert vips.observe(fake.snapshot()) == 1010


def test_the_loop_exports_and_serves_it() -> None:
    receiver = GrpcReceiver().start()
    try:
        _loop_exports_and_serves(receiver)
    finally:
        receiver.stop()


def _loop_exports_and_serves(receiver: GrpcReceiver) -> None:
    fake = FakeMap()
    fake.add(TO_VIP, 1000, 2)
    fake.add(TO_POD, 5000, 5)
    otlp = OtlpConfig(endpoints=(f"http://127.0.0.1:{receiver.port}",), timeout_s=1.0)
    exporter = Exporter(otlp, NODE, max_backoff_s=0.1)
    idx = index()
    vips = ServiceVipBytes(Catalog(), fake.now_ns - SEC)  # what command.py wires in cgroup mode
    svc = AgentService(AgentConfig(node_name=NODE, otlp=otlp), fake, exporter,
                       LocalFlows(NODE, idx, interface_addresses=frozenset), idx, host_name="h1",
                       datapath="cgroup", vips=vips)  # fmt: skip
    once(svc)
    fake.add(TO_VIP, 24)
    once(svc)
    exporter.close()
    sent = points(receiver.snapshot(), schema.OTLP_AGENT_SERVICE_VIP_BYTES)
    assert [p["_value"] for p in sent] == [1000, 1024]
    report = svc.health.report
    assert report is not None and report.service_vip_bytes == 1024
    served = {m.name: m.samples[0].value for m in report_metrics(report)}
    assert served[schema.AGENT_SERVICE_VIP_BYTES] == 1024
    flows = {p[schema.DESTINATION_ADDRESS] for p in points(receiver.snapshot(), schema.FLOW_BYTES)}
    assert flows == {VIP, BACKEND}  # the VIP flow is exported as ever: the enricher names its Service
