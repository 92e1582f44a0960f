"""Metadata that cannot sync, through the RBAC-enforcing API server and the real `kubernetes` client, each
component with its own token (DESIGN §5.8):

- each resource a component's ClusterRole grants, removed in turn: the agent's metadata and the enricher
  report themselves unready (`/readyz` 503 naming the resource and the 403, `..._metadata_synced 0`),
  never running on as if nothing were wrong; except Services or EndpointSlices for the enricher: it stays
  ready on pods and nodes and its savings are off (`kzt_savings_enabled 0`, a warning naming why);
- refused after the first sync (RBAC changed, watches re-established): unready, and ready again once
  the rules are back;
- a failing source logs a WARNING naming the resource and the HTTP status at least once a minute (also
  from the real `otel-kzt enricher` process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from otel_kzt.agent.health import metadata_state
from otel_kzt.enricher.service import EnricherService
from otel_kzt.k8s import MetadataHandle, open_metadata
from otel_kzt.k8s.apisource import WatchConfig, api_sources
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.kubeclient import load_api_client
from otel_kzt.k8s.servicemodel import ServiceRef
from tests.integration import deploy_stack as ds
from tests.integration.test_enricher_service import get, local_config, metrics_showing, write_metadata
from tests.support.k8s_apiserver import AGENT, ENRICHER, FakeApiServer
from tests.support.k8s_objects import fresh, make_node, make_pod
from tests.support.k8s_rbac import Rbac

FAST = WatchConfig(initial_backoff_s=0.05, max_backoff_s=0.2, read_timeout_s=10.0)
NODE = "ip-10-0-1-23.eu-west-1.compute.internal"
# What each component cannot do without; anything else it is granted is optional.
REQUIRED = {"pods", "nodes"}


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
    return result


def refused(index: ClusterIndex) -> str | None:
    """The agent's readiness line while it names a 403, else None."""
    synced, why = metadata_state(index)
    return why if not synced and "403" in why else None


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def objects() -> list[dict[str, Any]]:
    return [
        make_node(NODE, ["10.0.1.23"], zone="eu-west-1a"),
        make_pod("checkout-1", NODE, ["10.0.1.17"]),
        fresh("service-clusterip"),
        fresh("service-headless-topology-auto"),
        fresh("endpointslice-checkout"),
    ]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval_s=0.2) as server:
        server.add_many(objects())
        yield server


def handle_as(api: FakeApiServer, tmp_path: Path, account: tuple[str, str], **kw: Any) -> MetadataHandle:
    client, _ = load_api_client(api.write_kubeconfig(tmp_path / f"{account[1]}.kubeconfig", account))
    index = ClusterIndex()
    return MetadataHandle(index, list(api_sources(client, index, config=FAST, **kw)), "test", client.close)


def test_the_agent_reads_no_services(api: FakeApiServer, tmp_path: Path) -> None:
    """Node-scoped, the agent asks only for its node and its pods: nothing its role does not grant."""
    with open_metadata(None, node_name=NODE, kubeconfig=api.write_kubeconfig(tmp_path / "k", AGENT)) as h:
        assert h.wait_ready(10)
        assert metadata_state(h.index) == (True, "metadata synced")
    assert not api.refusals
    assert {r.split()[1] for r in api.requests if r.split()[0] in ("list", "watch")} == {"pods", "nodes"}


def test_the_agent_in_cgroup_mode_reads_service_vips_with_its_own_role(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """`service_vips` (cgroup mode): every Service's cluster IPs, cluster-wide, granted by the shipped
    role; no EndpointSlices, no version. Refused, the agent stays ready and knows no VIP."""
    kubeconfig = api.write_kubeconfig(tmp_path / "k", AGENT)
    with open_metadata(None, node_name=NODE, kubeconfig=kubeconfig, service_vips=True) as h:
        assert h.wait_ready(10)
        eventually(h.index.services.available, "Services listed")
        assert h.index.services.service_of_vip("172.20.41.17") == ServiceRef("shop", "checkout")
    assert not api.refusals
    listed = {r.split()[1] for r in api.requests if r.split()[0] in ("list", "watch")}
    assert listed == {"pods", "nodes", "services"}
    with FakeApiServer(rbac=Rbac.shipped().without("otel-kzt-agent", "services")) as denied:
        denied.add_many(objects())
        kubeconfig = denied.write_kubeconfig(tmp_path / "denied", AGENT)
        with open_metadata(None, node_name=NODE, kubeconfig=kubeconfig, service_vips=True) as h:
            eventually(lambda: "403" in h.index.services.reason(), "the 403 noted")
            assert h.wait_ready(10) and metadata_state(h.index)[0]
            assert h.index.services.service_of_vip("172.20.41.17") is None


@pytest.mark.parametrize("resource", sorted(REQUIRED))
def test_agent_without_a_granted_resource_is_not_ready(tmp_path: Path, resource: str) -> None:
    """The agent's readiness check (`metadata_state`, what /readyz and kzt_agent_metadata_synced show) on
    its real metadata path; tests/kernel/test_agent_health.py shows the same from the running agent."""
    with FakeApiServer(rbac=Rbac.shipped().without("otel-kzt-agent", resource)) as api:
        api.add_many(objects())
        kubeconfig = api.write_kubeconfig(tmp_path / "agent", AGENT)
        with open_metadata(None, node_name=NODE, kubeconfig=kubeconfig) as handle:
            why = eventually(lambda: refused(handle.index), "the 403 said")
            synced, _ = metadata_state(handle.index)
            assert not synced and resource in REQUIRED
            assert why.startswith("metadata not synced: ")  # the other resource may still be listing
            assert f"list {resource}: HTTP 403 Forbidden: {resource} " in why
            assert 'User "system:serviceaccount:otel-kzt:otel-kzt-agent" cannot list' in why
            assert not handle.index.ready()  # its pods unnamed: not exported, and it says so


def enricher_on(api: FakeApiServer, tmp_path: Path, **kw: Any) -> EnricherService:
    config = replace(
        local_config(write_metadata(tmp_path / "unused.json")),
        kube_metadata=None,
        kubeconfig=api.write_kubeconfig(tmp_path / "enricher", ENRICHER),
        **kw,
    )
    svc = EnricherService(config)
    svc.start()
    return svc


@pytest.mark.parametrize("resource", sorted({r for _, r in Rbac.shipped().granted("otel-kzt-enricher")}))
def test_enricher_without_a_granted_resource(
    tmp_path: Path, resource: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with FakeApiServer(rbac=Rbac.shipped().without("otel-kzt-enricher", resource)) as api:
        api.add_many(objects())
        svc = enricher_on(api, tmp_path)
        try:
            base = f"http://127.0.0.1:{svc.ports['metrics']}"
            if resource in REQUIRED:
                eventually(lambda: "403" in get(f"{base}/readyz")[1], "readyz names the 403")
                status, body = get(f"{base}/readyz")
                assert status == 503
                assert f"list {resource}: HTTP 403 Forbidden: {resource} is forbidden" in body
                metrics_showing(f"{base}/metrics", "kzt_enricher_metadata_synced 0.0")
            else:
                eventually(lambda: get(f"{base}/readyz")[0] == 200, "ready on pods and nodes")
                metrics_showing(f"{base}/metrics", "kzt_enricher_metadata_synced 1.0")
                metrics_showing(f"{base}/metrics", "kzt_savings_enabled 0.0", timeout_s=15.0)
                said = eventually(lambda: [m for m in messages(caplog) if "savings off" in m], "savings off")
                assert f"{resource}: HTTP 403 Forbidden" in said[0] and "stays ready" in said[0]
                assert get(f"{base}/readyz")[0] == 200
            warned = [r for r in caplog.records if r.levelno == logging.WARNING and f"resource={resource}" in
                      r.getMessage() and "status=403" in r.getMessage()]  # fmt: skip
            assert warned, "a WARNING names the resource and the HTTP status"
        finally:
            svc.shutdown()


def test_enricher_with_everything_granted_has_savings_on(api: FakeApiServer, tmp_path: Path) -> None:
    svc = enricher_on(api, tmp_path)
    try:
        base = f"http://127.0.0.1:{svc.ports['metrics']}"
        eventually(lambda: get(f"{base}/readyz")[0] == 200, "ready")
        metrics_showing(f"{base}/metrics", "kzt_savings_enabled 1.0", timeout_s=15.0)
    finally:
        svc.shutdown()
    assert not api.refusals


def test_refused_after_the_first_sync_is_unready_until_the_rules_are_back(
    api: FakeApiServer, tmp_path: Path
) -> None:
    with handle_as(api, tmp_path, AGENT, node_name=NODE) as handle:
        assert handle.wait_ready(10) and metadata_state(handle.index)[0]
        api.set_rbac(Rbac.shipped().without("otel-kzt-agent", "nodes"))
        api.drop_connections()  # an open watch is not re-authorised; its next one is (an API server restart)
        why = eventually(lambda: refused(handle.index), "unready")
        assert "watch nodes: HTTP 403 Forbidden" in why
        assert handle.index.lookup("10.0.1.17") is not None  # the last answers keep naming its pods
        api.set_rbac(Rbac.shipped())
        eventually(lambda: metadata_state(handle.index)[0], "ready again")
        assert handle.index.sync_state().failures == ()


def test_services_refused_after_the_first_sync_come_back_without_a_relist(
    api: FakeApiServer, tmp_path: Path
) -> None:
    with handle_as(api, tmp_path, ENRICHER) as handle:
        catalog = handle.index.services
        eventually(catalog.available, "Services available")
        lists = api.requests.count("list services")
        api.set_rbac(Rbac.shipped().without("otel-kzt-enricher", "services"))
        api.drop_connections()
        eventually(lambda: not catalog.available(), "Services off")
        assert "watch services: HTTP 403 Forbidden" in catalog.reason()
        assert handle.index.sync_state().synced  # pods and nodes: still ready
        api.set_rbac(Rbac.shipped())
        eventually(catalog.available, "Services on again")
        assert api.requests.count("list services") == lists  # the watch resumed, nothing re-listed


def test_a_refused_source_warns_at_least_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    default = WatchConfig()
    assert default.max_backoff_s * 1.5 < 60  # the longest jittered wait between two attempts (and warnings)
    caplog.set_level(logging.WARNING, logger="otel_kzt.k8s.apisource")
    with FakeApiServer(rbac=Rbac.shipped().without("otel-kzt-enricher", "pods")) as api:
        handle = handle_as(api, tmp_path, ENRICHER)
        with handle:
            eventually(lambda: len([m for m in messages(caplog) if "resource=pods" in m]) >= 3, "warnings")
    lines = [m for m in messages(caplog) if "resource=pods" in m]
    assert all("status=403 reason=Forbidden" in line for line in lines)
    assert 'cannot list resource "pods"' in lines[0]


def test_the_enricher_command_refused_pods_is_unready_and_says_so(tmp_path: Path) -> None:
    """The real `otel-kzt enricher --kubeconfig` process: /readyz 503 naming the 403, the gauge 0, and its
    log repeats the WARNING with the resource and the status while the refusal lasts."""
    with FakeApiServer(rbac=Rbac.shipped().without("otel-kzt-enricher", "pods")) as api:
        api.add_many(objects())
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", ENRICHER)
        enricher = ds.EnricherProcess(tmp_path, ["--kubeconfig", kubeconfig], "kz-refused")
        try:
            readyz = f"http://{enricher.metrics_target}/readyz"
            ds.wait_for(lambda: b"403" in ds.http_get(readyz)[1], 30, "/readyz names the 403")
            status, body = ds.http_get(readyz)
            assert status == 503 and b"list pods: HTTP 403 Forbidden: pods is forbidden" in body
            metrics_showing(f"http://{enricher.metrics_target}/metrics", "kzt_enricher_metadata_synced 0.0")
            ds.wait_for(lambda: enricher.tail().count("resource=pods status=403") >= 2, 30, "warned twice")
            assert "WARNING" in enricher.tail()
        finally:
            enricher.stop()
