"""The metadata package's public surface, pinned: the agent, the enricher and the demo code against it."""

from __future__ import annotations

import gc
import inspect
import threading

from otel_kzt import k8s
from otel_kzt.k8s.decode import gc_paused
from otel_kzt.k8s.model import MetadataIndex


def test_exported_names() -> None:
    assert sorted(k8s.__all__) == [
        "ClusterIndex", "Endpoint", "MetadataHandle", "MetadataIndex", "NodeInfo", "open_metadata",
    ]
    for name in k8s.__all__:
        assert getattr(k8s, name) is not None


def test_open_metadata_signature() -> None:
    params = inspect.signature(k8s.open_metadata).parameters
    assert list(params)[:3] == ["kube_metadata_file", "node_name", "kubeconfig"]
    assert params["node_name"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["kubeconfig"].kind is inspect.Parameter.KEYWORD_ONLY


def test_cluster_index_is_a_metadata_index() -> None:
    index: MetadataIndex = k8s.ClusterIndex()  # mypy checks the Protocol; this checks the writer API
    assert index.ready() is False and index.generation == 0
    for method in ("register_source", "mark_synced", "upsert_pod", "delete_pod", "replace_pods",
                   "upsert_node", "delete_node", "replace_nodes", "expire", "sources"):
        assert callable(getattr(k8s.ClusterIndex, method))


def test_handle_methods() -> None:
    for method in ("start", "shutdown", "wait_ready", "status", "__enter__", "__exit__"):
        assert callable(getattr(k8s.MetadataHandle, method))


def test_gc_paused_nests_across_threads_and_restores() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    with gc_paused():
        assert not gc.isenabled()
        thread.start()
        assert inside.wait(5)
    assert not gc.isenabled()  # the other thread is still parsing
    release.set()
    thread.join()
    assert gc.isenabled()


def test_gc_paused_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
