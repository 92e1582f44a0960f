"""Services and EndpointSlices through the real `kubernetes` client, under the enricher's own token and
the RBAC `deploy/rbac.yaml` grants it: listed, watched (a routing change is timed), `/version` read, and,
when RBAC refuses them, Service features off with the server's 403 named while pods and nodes stay ready.
The file source answers the same as the API source."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from otel_kzt.k8s import MetadataHandle, open_metadata
from otel_kzt.k8s.apisource import WatchConfig, api_sources
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.kubeclient import load_api_client
from otel_kzt.k8s.servicemodel import ClusterVersion
from tests.integration.test_k8s_apisource import eventually
from tests.support.k8s_apiserver import AGENT, ENRICHER, FakeApiServer
from tests.support.k8s_objects import as_list, make_node, make_pod
from tests.support.k8s_rbac import Rbac, load_manifest
from tests.support.service_fixtures import CHECKOUT, PAYMENTS, shapes

FAST = WatchConfig(page_size=2, initial_backoff_s=0.05, max_backoff_s=0.2, read_timeout_s=10.0)


def _handle(api: FakeApiServer, tmp_path: Path, account: tuple[str, str] = ENRICHER) -> MetadataHandle:
    client, _ = load_api_client(api.write_kubeconfig(tmp_path / "kubeconfig", account))
    index = ClusterIndex()
    return MetadataHandle(index, list(api_sources(client, index, config=FAST)), "test", client.close)


@contextlib.contextmanager
def _server() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval_s=0.2, git_version="v1.32.3-eks-4a1b") as server:
        server.add_many([make_node("n1", ["10.1.0.1"], zone="eu-west-1a"),
                         make_pod("web-1", "n1", ["10.2.0.1"]), *shapes()])  # fmt: skip
        yield server


def test_listed_and_watched_under_the_enricher_rbac(tmp_path: Path) -> None:
    with _server() as api, _handle(api, tmp_path) as h:
        assert h.wait_ready(10)
        catalog = h.index.services
        eventually(catalog.available)
        assert {v.ref.name for v in catalog.services()} == {"checkout", "payments", "postgres",
                                                             "ingress-nginx-controller"}
        assert catalog.service_at("10.0.1.17", 8080, "tcp") == CHECKOUT
        assert catalog.service_at("fd00:2::1f", 8443, "tcp") == PAYMENTS
        assert catalog.cluster_version() == ClusterVersion(1, 32, "v1.32.3-eks-4a1b")
        before = time.time()
        svc = next(o for o in api.objects("Service") if o["metadata"]["name"] == "checkout")
        svc["spec"]["trafficDistribution"] = "PreferClose"
        api.update(svc)
        eventually(lambda: catalog.service(CHECKOUT).routing == "PreferClose")  # type: ignore[union-attr]
        changed = catalog.service(CHECKOUT).changed_unix_s  # type: ignore[union-attr]
        assert changed is not None and changed >= before
        api.delete("EndpointSlice", "checkout-7xk2p", "shop")
        eventually(lambda: catalog.service(CHECKOUT).endpoints == ())  # type: ignore[union-attr]
    assert not any("403" in r for r in api.refusals)


def test_refused_services_turn_savings_off_and_pods_stay_ready(tmp_path: Path) -> None:
    objects = load_manifest()
    for obj in objects:  # the enricher's role as it was before Services were granted
        if obj["kind"] == "ClusterRole" and obj["metadata"]["name"] == "otel-kzt-enricher":
            obj["rules"] = [r for r in obj["rules"] if "pods" in r["resources"]]
    with _server() as api:
        api.set_rbac(Rbac(objects))
        with _handle(api, tmp_path) as h:
            assert h.wait_ready(10)  # pods and nodes: ready regardless
            assert h.index.lookup("10.2.0.1") is not None
            catalog = h.index.services
            eventually(lambda: "403" in catalog.reason())
            assert not catalog.available() and catalog.services() == ()
            assert 'cannot list resource "services"' in catalog.reason()
            assert catalog.service_at("10.0.1.17", 8080, "tcp") is None
            api.set_rbac(Rbac.shipped())  # fixed: it lists again and turns on
            eventually(catalog.available)
            assert catalog.service_at("10.0.1.17", 8080, "tcp") == CHECKOUT


def test_the_agent_asks_for_no_services(tmp_path: Path) -> None:
    with _server() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "agent", AGENT)
        with open_metadata(None, node_name="n1", kubeconfig=kubeconfig) as h:
            assert h.wait_ready(10)
            assert not h.index.services.available()
        assert not any("services" in r or "endpointslices" in r for r in api.requests)


def test_file_source_answers_as_the_api_source(tmp_path: Path) -> None:
    with _server() as api, _handle(api, tmp_path) as h:
        assert h.wait_ready(10)
        eventually(h.index.services.available)
        path = tmp_path / "cluster.yaml"
        kinds = ("Node", "Pod", "Service", "EndpointSlice")
        path.write_text(yaml.safe_dump(as_list([o for k in kinds for o in api.objects(k)])))
        with open_metadata(str(path)) as from_file:
            assert from_file.index.services.available()
            got, want = from_file.index.services.services(), h.index.services.services()
            assert got == want and len(want) == 4
            for address, port in (("10.0.1.17", 8080), ("10.0.3.9", 8080), ("fd00:1::1e", 8443)):
                assert from_file.index.services.services_at(address, port, "tcp") == (
                    h.index.services.services_at(address, port, "tcp"))
        assert json.dumps([v.ref.name for v in got])
