"""The API source through the real `kubernetes` client against the test API server.

Initial (paginated) sync, adds/updates/deletes, 410 recovery, dropped connections, node-scoped watches,
IP reuse, host-network and dual-stack pods, and the file source answering exactly like the API source.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_kzt.errors import MetadataError
from otel_kzt.k8s import MetadataHandle, open_metadata
from otel_kzt.k8s.apisource import ApiSource, WatchConfig, api_sources
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.kubeclient import load_api_client
from otel_kzt.schema import WorkloadKind
from tests.support.k8s_apiserver import AGENT, ENRICHER, FakeApiServer
from tests.support.k8s_objects import as_list, fresh, make_node, make_pod

FAST = WatchConfig(page_size=3, initial_backoff_s=0.05, max_backoff_s=0.2, read_timeout_s=10.0)


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def pod_name(handle: MetadataHandle, ip: str, at: float | None = None) -> str | None:
    found = handle.index.lookup(ip, at)
    return found.pod_name if found else None


def cluster() -> list[dict[str, Any]]:
    """Two zones, the real fixtures, and enough pods for several list pages."""
    objects = [make_node("n1", ["10.1.0.1"], zone="us-east-1a"),
               make_node("n2", ["10.1.0.2"], zone="us-east-1b")]
    objects += [fresh(n) for n in ("node-eks", "node-dualstack-nozone", "pod-deployment",
                                   "pod-daemonset-hostnetwork", "pod-dualstack-bare", "pod-cronjob")]
    objects += [make_pod(f"web-{i}", "n1" if i % 2 else "n2", [f"10.2.0.{i}"]) for i in range(1, 8)]
    return objects


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval_s=0.2) as server:
        server.add_many(cluster())
        yield server


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> str:
    return api.write_kubeconfig(tmp_path / "kubeconfig", ENRICHER)


@pytest.fixture
def handle(kubeconfig: str) -> Iterator[MetadataHandle]:
    client, _ = load_api_client(kubeconfig)
    index = ClusterIndex()
    h = MetadataHandle(index, list(api_sources(client, index, config=FAST)), "test", client.close)
    h.start()
    try:
        assert h.wait_ready(10)
        yield h
    finally:
        h.shutdown()


def pods_source(handle: MetadataHandle) -> ApiSource:
    source = next(s for s in handle.sources if s.name == "api-pods")
    assert isinstance(source, ApiSource)
    return source


def test_initial_sync_is_paginated_and_complete(api: FakeApiServer, handle: MetadataHandle) -> None:
    assert api.requests.count("list pods") == 4  # 11 pods, 3 a page
    assert handle.index.pod_count == 11 and handle.index.node_count == 4
    assert pod_name(handle, "10.2.0.7") == "web-7"
    checkout = handle.index.lookup("10.0.12.77")
    assert checkout is not None and checkout.workload_kind is WorkloadKind.DEPLOYMENT
    n2 = handle.index.node("n2")
    assert n2 is not None and n2.zone == "us-east-1b"


def test_adds_updates_deletes(api: FakeApiServer, handle: MetadataHandle) -> None:
    api.add(make_pod("new", "n1", ["10.3.0.1"], owner=("StatefulSet", "db"), template_hash=None))
    eventually(lambda: pod_name(handle, "10.3.0.1") == "new")
    moved = make_pod("new", "n1", ["10.3.0.2"], owner=("StatefulSet", "db"), template_hash=None,
                     uid=api.objects("Pod")[-1]["metadata"]["uid"])
    api.update(moved)
    eventually(lambda: pod_name(handle, "10.3.0.2") == "new")
    released_at = time.time()
    api.delete("Pod", "new", "shop")
    eventually(lambda: handle.index.pod_count == 11)
    assert pod_name(handle, "10.3.0.2", released_at) == "new"  # history
    assert handle.index.lookup("10.3.0.2", released_at + 3600) is None
    relabelled = make_node("n2", ["10.1.0.2"], zone="us-east-1c")
    api.update(relabelled)
    eventually(lambda: getattr(handle.index.node("n2"), "zone", None) == "us-east-1c")
    api.delete("Node", "n2")
    eventually(lambda: handle.index.node("n2") is None)


def test_gone_triggers_relist_that_catches_missed_changes(api: FakeApiServer, handle: MetadataHandle) -> None:
    api.refuse_watches = True  # an API server restarting: watches fail until it is back
    api.drop_connections()
    api.delete("Pod", "web-1", "shop")
    api.add(make_pod("late", "n2", ["10.3.0.9"]))
    api.compact()  # and its history is gone
    api.refuse_watches = False
    eventually(lambda: pod_name(handle, "10.3.0.9") == "late")
    assert pods_source(handle).gone >= 1
    assert api.requests.count("list pods") >= 8  # the initial four pages, then a full re-list
    assert handle.index.pod_count == 11
    assert handle.index.lookup("10.2.0.1", time.time() + 3600) is None  # web-1's deletion was not missed


def test_expired_continue_restarts_the_list(api: FakeApiServer, kubeconfig: str) -> None:
    api.fail_continues = 1
    client, _ = load_api_client(kubeconfig)
    index = ClusterIndex()
    with MetadataHandle(index, list(api_sources(client, index, config=FAST)), "t", client.close) as h:
        assert h.wait_ready(10)
        assert index.pod_count == 11
        gone = sum(s.gone for s in h.sources if isinstance(s, ApiSource))
        assert gone == 1  # the first continue failed with 410: that listing started over, once


def test_dropped_connections_are_resumed(api: FakeApiServer, handle: MetadataHandle) -> None:
    api.wait_for_watchers("pods", 1)
    for round_ in range(3):
        api.drop_connections()
        api.add(make_pod(f"after-drop-{round_}", "n1", [f"10.4.0.{round_}"]))
        eventually(lambda r=round_: pod_name(handle, f"10.4.0.{r}") == f"after-drop-{r}")  # type: ignore[misc]
    assert api.requests.count("watch pods") >= 4
    assert pods_source(handle).gone == 0  # resumed from the last version, no re-list needed


def test_node_scoped_watch(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "agent-kubeconfig", AGENT)
    with open_metadata(None, node_name="n1", kubeconfig=kubeconfig) as h:
        assert h.wait_ready(10)
        assert pod_name(h, "10.2.0.1") == "web-1"  # on n1
        assert h.index.lookup("10.2.0.2") is None  # on n2: not this agent's business
        assert h.index.node("n1") is not None and h.index.node("n2") is None
        api.add(make_pod("local", "n1", ["10.5.0.1"]))
        api.add(make_pod("remote", "n2", ["10.5.0.2"]))
        eventually(lambda: pod_name(h, "10.5.0.1") == "local")
        assert h.index.lookup("10.5.0.2") is None
    assert any("fieldSelector=spec.nodeName%3Dn1" in r for r in api.requests_raw)
    assert any("fieldSelector=metadata.name%3Dn1" in r for r in api.requests_raw)


def test_ip_reuse_named_on_both_sides(api: FakeApiServer, handle: MetadataHandle) -> None:
    before = time.time()
    time.sleep(0.01)
    api.delete("Pod", "web-3", "shop")
    eventually(lambda: handle.index.pod_count == 10)
    time.sleep(0.01)
    between = time.time()
    time.sleep(0.01)
    api.add(make_pod("reuser", "n2", ["10.2.0.3"], owner=("DaemonSet", "agent"), template_hash=None))
    eventually(lambda: pod_name(handle, "10.2.0.3") == "reuser")
    assert pod_name(handle, "10.2.0.3", before) == "web-3"
    assert pod_name(handle, "10.2.0.3", between) == "web-3"
    assert pod_name(handle, "10.2.0.3", time.time()) == "reuser"


def test_host_network_and_dual_stack(handle: MetadataHandle) -> None:
    host = handle.index.lookup("10.0.12.34")
    assert host is not None and host.workload_kind is WorkloadKind.NODE and host.pod_name is None
    assert host.node_name == "ip-10-0-12-34.ec2.internal"
    v4, v6 = handle.index.lookup("10.244.3.9"), handle.index.lookup("fd00:10:244:3::9")
    assert v4 is not None and v4 == v6 and v4.workload_kind is WorkloadKind.POD
    node6 = handle.index.lookup("2001:db8:0:1::13")
    assert node6 is not None and node6.is_node and node6.node_name == "worker-3"


def test_file_source_agrees_with_api_source(
    api: FakeApiServer, handle: MetadataHandle, tmp_path: Path
) -> None:
    objects = api.objects("Node") + api.objects("Pod")  # exactly what the API source was served
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(as_list(objects)))
    ips = {"10.0.12.34", "3.91.22.14", "2001:db8:0:1::13", "203.0.113.1", "10.244.2.31"}
    for obj in objects:
        ips.update(e["ip"] for e in obj.get("status", {}).get("podIPs", []))
        ips.update(a["address"] for a in obj.get("status", {}).get("addresses", []))
    with open_metadata(str(path)) as from_file:
        for ip in sorted(ips):
            assert from_file.index.lookup(ip) == handle.index.lookup(ip), ip
        for node in ("n1", "n2", "ip-10-0-12-34.ec2.internal", "worker-3", "absent"):
            assert from_file.index.node(node) == handle.index.node(node), node
    assert sum(handle.index.lookup(ip) is not None for ip in ips) >= 14  # the comparison was not vacuous


def test_shutdown_leaves_nothing_running(kubeconfig: str) -> None:
    h = open_metadata(None, kubeconfig=kubeconfig)
    h.shutdown()  # before start: fine
    h.start()
    assert h.wait_ready(10)
    h.shutdown()
    h.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("kzt-metadata")]


def test_no_configuration_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MetadataError, match="kube-metadata"):
        open_metadata(None, kubeconfig=str(tmp_path / "absent"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(MetadataError):
        open_metadata(None)


def test_shutdown_cuts_a_quiet_watch_at_once(tmp_path: Path) -> None:
    with FakeApiServer(bookmark_interval_s=60) as quiet:  # no byte for a minute on an idle watch
        quiet.add(make_node("n1", ["10.1.0.1"]))
        h = open_metadata(None, kubeconfig=quiet.write_kubeconfig(tmp_path / "kubeconfig", ENRICHER))
        h.start()
        assert h.wait_ready(10)
        quiet.wait_for_watchers("pods", 1)
        quiet.wait_for_watchers("nodes", 1)
        started = time.monotonic()
        h.shutdown()
        assert time.monotonic() - started < 2.0


def test_refused_watches_back_off_without_a_hot_loop(api: FakeApiServer, handle: MetadataHandle) -> None:
    api.wait_for_watchers("pods", 1)
    api.refuse_watches = True
    api.drop_connections()
    time.sleep(1.0)
    attempts = api.requests.count("watch pods")
    api.refuse_watches = False
    # FAST: backoff 0.05 s doubling to 0.2 s with jitter: a handful of retries a second, not thousands.
    assert 2 <= attempts <= 40, attempts
    assert pods_source(handle).reconnects >= 2
    api.add(make_pod("back", "n1", ["10.6.0.1"]))
    eventually(lambda: pod_name(handle, "10.6.0.1") == "back")


def test_malformed_objects_are_skipped_and_counted(api: FakeApiServer, handle: MetadataHandle) -> None:
    broken = make_pod("broken", "n1", ["10.7.0.1"])
    broken["status"]["podIPs"] = "10.7.0.1"  # not a list of {"ip": ...}
    api.add(broken)
    api.add(make_pod("fine", "n1", ["10.7.0.2"]))
    eventually(lambda: pod_name(handle, "10.7.0.2") == "fine")
    assert pods_source(handle).bad_objects == 1
    assert handle.index.lookup("10.7.0.1") is None


def test_quiet_watch_past_the_read_timeout_reconnects_quietly(tmp_path: Path) -> None:
    with FakeApiServer(bookmark_interval_s=60) as quiet:
        quiet.add(make_node("n1", ["10.1.0.1"]))
        client, _ = load_api_client(quiet.write_kubeconfig(tmp_path / "kubeconfig", ENRICHER))
        index = ClusterIndex()
        config = WatchConfig(read_timeout_s=0.3, initial_backoff_s=5.0)  # a backoff would stall the test
        with MetadataHandle(index, list(api_sources(client, index, config=config)), "t", client.close) as h:
            assert h.wait_ready(10)
            quiet.wait_for_watchers("nodes", 3)  # two read timeouts later, still watching
            assert all(s.reconnects == 0 for s in h.sources if isinstance(s, ApiSource))
            quiet.add(make_pod("late", "n1", ["10.8.0.1"]))
            eventually(lambda: pod_name(h, "10.8.0.1") == "late")
