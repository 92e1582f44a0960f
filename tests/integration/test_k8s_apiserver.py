"""The test API server itself, driven by the real client's typed API (strict model validation included).

If these pass, the objects it serves are ones kubernetes 37 accepts, and its list/watch/410/selector
behaviour is what client code written against a real API server expects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from tests.support.k8s_apiserver import ADMIN, ENRICHER, FakeApiServer
from tests.support.k8s_objects import fresh, make_node, make_pod


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval_s=0.1) as server:
        server.add_many([make_node("n1", ["10.1.0.1"]), make_node("n2", ["10.1.0.2"])])
        server.add_many([make_pod(f"web-{i}", f"n{1 + i % 2}", [f"10.2.0.{i}"]) for i in range(5)])
        server.add(fresh("pod-statefulset"))
        yield server


@pytest.fixture
def core(api: FakeApiServer, tmp_path: Path) -> Iterator[k8s_client.CoreV1Api]:
    """What the enricher's own ServiceAccount may read: these tests need no more."""
    with api.client(tmp_path / "kubeconfig", ENRICHER) as api_client:
        yield k8s_client.CoreV1Api(api_client)


def test_typed_pagination_and_models(core: k8s_client.CoreV1Api) -> None:
    names: list[str] = []
    token = None
    versions = set()
    while True:
        page = core.list_pod_for_all_namespaces(limit=2, _continue=token)
        names += [p.metadata.name for p in page.items]
        versions.add(page.metadata.resource_version)
        assert all(p.spec.containers for p in page.items)  # realistic objects pass strict validation
        token = page.metadata._continue
        if not token:
            break
    assert sorted(names) == sorted([*(f"web-{i}" for i in range(5)), "postgres-1"])
    assert len(versions) == 1  # every page comes from one snapshot
    nodes = core.list_node()
    assert [n.metadata.name for n in nodes.items] == ["n1", "n2"]


def test_field_selectors_and_namespaces(core: k8s_client.CoreV1Api) -> None:
    on_n1 = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert sorted(p.metadata.name for p in on_n1.items) == ["web-0", "web-2", "web-4"]
    not_n1 = core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=n1")
    assert sorted(p.metadata.name for p in not_n1.items) == ["postgres-1", "web-1", "web-3"]
    assert [n.metadata.name for n in core.list_node(field_selector="metadata.name=n2").items] == ["n2"]
    assert len(core.list_namespaced_pod("shop").items) == 6
    assert core.list_namespaced_pod("other").items == []
    with pytest.raises(ApiException) as info:
        core.list_node(field_selector="status.phase=Running")
    assert info.value.status == 400


def test_expired_continue_is_gone(api: FakeApiServer, core: k8s_client.CoreV1Api) -> None:
    page = core.list_pod_for_all_namespaces(limit=2)
    api.compact()
    with pytest.raises(ApiException) as info:
        core.list_pod_for_all_namespaces(limit=2, _continue=page.metadata._continue)
    assert info.value.status == 410


def test_watch_streams_changes_and_bookmarks(api: FakeApiServer, core: k8s_client.CoreV1Api) -> None:
    start = core.list_node().metadata.resource_version
    api.add(make_node("n3", ["10.1.0.3"]))
    api.update(make_node("n3", ["10.1.0.33"]))
    api.delete("Node", "n3")
    api.add(make_pod("ignored", "n1", ["10.9.0.1"]))  # another resource: not in this stream
    seen: list[tuple[str, str]] = []
    for event in k8s_watch.Watch().stream(core.list_node, resource_version=start, timeout_seconds=1,
                                          allow_watch_bookmarks=True):
        # typed objects for changes; a BOOKMARK holds only a version, so the client leaves it raw
        seen.append((event["type"], event["raw_object"]["metadata"]["resourceVersion"]))
    types = [t for t, _ in seen]
    assert types[:3] == ["ADDED", "MODIFIED", "DELETED"]
    assert "BOOKMARK" in types[3:]
    assert seen[-1][1] == str(api.resource_version)  # bookmarks carry the newest version


def test_watch_without_version_starts_with_current_state(core: k8s_client.CoreV1Api) -> None:
    events = list(k8s_watch.Watch().stream(core.list_node, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "n1"), ("ADDED", "n2")]


def test_watch_from_compacted_version_gets_410(api: FakeApiServer, core: k8s_client.CoreV1Api) -> None:
    start = core.list_pod_for_all_namespaces().metadata.resource_version
    api.add(make_pod("new", "n1", ["10.9.0.2"]))
    api.compact()
    response = core.list_pod_for_all_namespaces(watch=True, resource_version=start, _preload_content=False)
    events: list[dict[str, Any]] = [json.loads(line) for line in response.data.splitlines()]
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["kind"] == "Status" and events[0]["object"]["code"] == 410


def test_drop_connections_ends_watches(api: FakeApiServer, core: k8s_client.CoreV1Api) -> None:
    response = core.list_node(watch=True, resource_version=str(api.resource_version), _preload_content=False)
    api.wait_for_watchers("nodes", 1)
    api.drop_connections()
    with pytest.raises(urllib3.exceptions.ProtocolError):  # the stream ended mid-chunk
        response.read()


def test_refused_watch_and_unknown_path(
    api: FakeApiServer, core: k8s_client.CoreV1Api, tmp_path: Path
) -> None:
    api.refuse_watches = True
    with pytest.raises(ApiException) as info:
        core.list_node(watch=True, _preload_content=False)
    assert info.value.status == 503
    with api.client(tmp_path / "admin", ADMIN) as admin, pytest.raises(ApiException) as missing:
        k8s_client.CoreV1Api(admin).list_namespaced_config_map("default")  # allowed, but not served
    assert missing.value.status == 404


def test_history_window_is_bounded_and_older_versions_are_gone(tmp_path: Path) -> None:
    with FakeApiServer(history_limit=10) as small:
        first = small.resource_version
        for i in range(30):
            small.add(make_node(f"n{i}", [f"10.1.0.{i}"]))
        assert 10 <= len(small.events) <= 11
        assert small.compacted_rv > first
        with small.client(tmp_path / "kubeconfig", ENRICHER) as api_client:
            core = k8s_client.CoreV1Api(api_client)
            old = core.list_node(watch=True, resource_version=str(first), _preload_content=False)
            assert json.loads(old.data.splitlines()[0])["object"]["code"] == 410
            recent = str(small.resource_version - 5)
            fresh_watch = core.list_node(watch=True, resource_version=recent, timeout_seconds=1,
                                         _preload_content=False)
            names = [json.loads(line)["object"]["metadata"]["name"] for line in fresh_watch.data.splitlines()]
            assert names[:5] == [f"n{i}" for i in range(25, 30)]
