"""The file source: kubectl's List in YAML or JSON, re-read on change, bad files handled clearly."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_kzt.errors import MetadataError
from otel_kzt.k8s import open_metadata
from otel_kzt.k8s.filesource import FileSource, parse_objects
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.schema import WorkloadKind
from tests.support.k8s_objects import as_list, fresh, make_node, make_pod

FIXTURE_NAMES = [
    "node-eks", "node-gke", "node-aks", "node-dualstack-nozone", "pod-deployment", "pod-statefulset",
    "pod-daemonset-hostnetwork", "pod-cronjob", "pod-dualstack-bare", "pod-pending",
]


def all_fixtures() -> list[dict[str, Any]]:
    return [fresh(name) for name in FIXTURE_NAMES]


def write(path: Path, objects: list[dict[str, Any]], fmt: str = "yaml") -> None:
    data = as_list(objects)
    path.write_text(yaml.safe_dump(data) if fmt == "yaml" else json.dumps(data, indent=2))


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_kubectl_list_in_yaml_and_json(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cluster.{fmt}"
    write(path, all_fixtures(), fmt)
    handle = open_metadata(str(path))
    handle.start()
    try:
        index = handle.index
        assert index.ready()
        checkout = index.lookup("10.0.12.77")
        assert checkout is not None
        assert (checkout.workload_kind, checkout.workload_name) == (WorkloadKind.DEPLOYMENT, "checkout")
        assert checkout.node_name == "ip-10-0-12-34.ec2.internal"
        node = index.lookup("10.0.12.34")  # the host-network node-exporter's IP: named by its node
        assert node is not None and node.is_node and node.workload_name == "ip-10-0-12-34.ec2.internal"
        assert index.lookup("fd00:10:244:3::9") == index.lookup("10.244.3.9") is not None
        assert index.lookup("10.244.2.31") is None  # the finished CronJob pod holds no IP
        gke = index.node("gke-prod-pool-1-5f2a9c3e-x7k2")
        assert gke is not None and (gke.zone, gke.provider) == ("europe-west1-b", "gcp")
        assert index.pod_count == 6 and index.node_count == 4
        status = handle.status()
        assert status["ready"] is True and status["sources"] == {"file": True}
        assert status["pods"] == 6 and status["source"] == f"file:{path}"
    finally:
        handle.shutdown()
        handle.shutdown()  # safe twice


def test_typed_lists_and_multiple_documents() -> None:
    pods = {"apiVersion": "v1", "kind": "PodList", "items": [
        {k: v for k, v in fresh("pod-statefulset").items() if k != "kind"}]}
    text = yaml.safe_dump(pods) + "---\n" + yaml.safe_dump(fresh("node-aks"))
    nodes, records = parse_objects(text)
    assert [n.name for n in nodes] == ["aks-nodepool1-31718369-vmss000002"]
    assert [r.endpoint.workload_name for r in records] == ["postgres"]


def test_poll_rereads_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    write(path, [make_node("n1", ["10.1.0.1"]), make_pod("web-1", "n1", ["10.2.0.1"])])
    index = ClusterIndex()
    source = FileSource(str(path), index)
    assert source.poll() is True
    assert source.poll() is False  # unchanged: no re-read
    generation = index.generation
    write(path, [make_node("n1", ["10.1.0.1"]), make_pod("web-2", "n1", ["10.2.0.2"])])
    assert source.poll() is True
    assert index.generation > generation
    found = index.lookup("10.2.0.2")
    assert found is not None and found.pod_name == "web-2"
    assert source.reloads == 2


def test_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    missing = open_metadata(str(tmp_path / "missing.yaml"))
    with pytest.raises(MetadataError, match=r"missing\.yaml"):
        missing.start()
    missing.shutdown()
    broken = tmp_path / "broken.yaml"
    broken.write_text("items: [unclosed\n")
    with pytest.raises(MetadataError, match="not valid YAML"):
        open_metadata(str(broken)).start()


def test_bad_rewrite_keeps_last_good_content(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    write(path, [make_pod("web-1", "n1", ["10.2.0.1"])], "json")
    index = ClusterIndex()
    source = FileSource(str(path), index)
    source.poll()
    path.write_text('{"kind": "List", "items": [')  # half-written
    assert source.poll() is False
    assert source.failures == 1
    found = index.lookup("10.2.0.1")
    assert found is not None and found.pod_name == "web-1"


def test_background_thread_picks_up_changes(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    write(path, [make_pod("web-1", "n1", ["10.2.0.1"])])
    handle = open_metadata(str(path), poll_interval_s=0.02)
    handle.start()
    try:
        write(path, [make_pod("web-1", "n1", ["10.2.0.1"]), make_pod("web-2", "n1", ["10.2.0.2"])])
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # mtime granularity on some fs
        deadline = time.monotonic() + 5
        while handle.index.lookup("10.2.0.2") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        found = handle.index.lookup("10.2.0.2")
        assert found is not None and found.pod_name == "web-2"
    finally:
        handle.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("kzt-metadata")]
