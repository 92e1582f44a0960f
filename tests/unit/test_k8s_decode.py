"""Raw Kubernetes objects -> PodRecord / NodeInfo: workloads, IPs, zones, providers (real fixtures)."""

from __future__ import annotations

from typing import Any

import pytest

from otel_kzt.k8s.decode import canonical_ip, decode_node, decode_pod, provider_of, resolve_workload
from otel_kzt.schema import WorkloadKind
from tests.support.k8s_objects import fresh


@pytest.mark.parametrize(
    ("fixture", "kind", "name", "ips"),
    [
        ("pod-deployment", WorkloadKind.DEPLOYMENT, "checkout", ("10.0.12.77",)),
        ("pod-statefulset", WorkloadKind.STATEFULSET, "postgres", ("10.48.3.12",)),
        # host network: the IP is the node's, so the pod holds none of its own
        ("pod-daemonset-hostnetwork", WorkloadKind.DAEMONSET, "node-exporter", ()),
        # finished: the kubelet released its IP, which may already be someone else's
        ("pod-cronjob", WorkloadKind.CRONJOB, "nightly-report", ()),
        ("pod-dualstack-bare", WorkloadKind.POD, "debug-shell", ("10.244.3.9", "fd00:10:244:3::9")),
        ("pod-pending", WorkloadKind.DEPLOYMENT, "checkout", ()),
    ],
)
def test_pod_fixtures(fixture: str, kind: WorkloadKind, name: str, ips: tuple[str, ...]) -> None:
    obj = fresh(fixture)
    record = decode_pod(obj)
    assert record.endpoint.workload_kind is kind
    assert record.endpoint.workload_name == name
    assert record.ips == ips
    assert record.uid == obj["metadata"]["uid"]
    assert record.endpoint.pod_name == obj["metadata"]["name"]
    assert record.endpoint.namespace == obj["metadata"]["namespace"]
    assert record.endpoint.node_name == obj["spec"].get("nodeName")


def test_running_cronjob_pod_holds_its_ip() -> None:
    obj = fresh("pod-cronjob")
    obj["status"]["phase"] = "Running"
    assert decode_pod(obj).ips == ("10.244.2.31",)


def test_pod_ip_fallback_and_canonical_ipv6() -> None:
    obj = fresh("pod-dualstack-bare")
    del obj["status"]["podIPs"]
    obj["status"]["podIP"] = "FD00:0:0:0::9"
    assert decode_pod(obj).ips == ("fd00::9",)


@pytest.mark.parametrize(
    ("owners", "labels", "expected"),
    [
        ([], {}, (WorkloadKind.POD, "p")),
        ([{"kind": "ReplicaSet", "name": "web-5d9f", "controller": True}], {"pod-template-hash": "5d9f"},
         (WorkloadKind.DEPLOYMENT, "web")),
        # a bare ReplicaSet (no template hash, or a hash that is not its suffix) stays a ReplicaSet
        ([{"kind": "ReplicaSet", "name": "web-rs", "controller": True}], {},
         (WorkloadKind.REPLICASET, "web-rs")),
        ([{"kind": "ReplicaSet", "name": "web-rs", "controller": True}], {"pod-template-hash": "abc"},
         (WorkloadKind.REPLICASET, "web-rs")),
        ([{"kind": "Job", "name": "backup-29391840", "controller": True}], {},
         (WorkloadKind.CRONJOB, "backup")),
        ([{"kind": "Job", "name": "backup-manual-x7", "controller": True}], {},
         (WorkloadKind.JOB, "backup-manual-x7")),
        ([{"kind": "Job", "name": "migrate-2", "controller": True}], {}, (WorkloadKind.JOB, "migrate-2")),
        ([{"kind": "DaemonSet", "name": "ds", "controller": True}], {}, (WorkloadKind.DAEMONSET, "ds")),
        # static (mirror) pods are owned by their Node: the pod is its own workload
        ([{"kind": "Node", "name": "n1", "controller": True}], {}, (WorkloadKind.POD, "p")),
        # the controller reference wins over an earlier non-controller one
        ([{"kind": "ConfigMap", "name": "cm"}, {"kind": "StatefulSet", "name": "db", "controller": True}], {},
         (WorkloadKind.STATEFULSET, "db")),
    ],
)
def test_resolve_workload(owners: list[dict[str, Any]], labels: dict[str, str],
                          expected: tuple[WorkloadKind, str]) -> None:
    assert resolve_workload("p", labels, owners) == expected


@pytest.mark.parametrize(
    ("fixture", "zone", "region", "provider", "addresses"),
    [
        ("node-eks", "us-east-1a", "us-east-1", "aws", ("10.0.12.34", "3.91.22.14")),
        ("node-gke", "europe-west1-b", "europe-west1", "gcp", None),
        ("node-aks", "westeurope-2", "westeurope", "azure", ("10.224.0.6",)),
        ("node-dualstack-nozone", None, None, None, ("192.0.2.13", "2001:db8:0:1::13")),
    ],
)
def test_node_fixtures(fixture: str, zone: str | None, region: str | None, provider: str | None,
                       addresses: tuple[str, ...] | None) -> None:
    obj = fresh(fixture)
    info = decode_node(obj)
    assert info.name == obj["metadata"]["name"]
    assert (info.zone, info.region, info.provider) == (zone, region, provider)
    if addresses is not None:
        assert info.addresses == addresses
    assert all(canonical_ip(a) == a for a in info.addresses)  # hostnames / DNS names are not addresses


def test_legacy_zone_labels_only() -> None:
    obj = fresh("node-eks")
    labels = obj["metadata"]["labels"]
    del labels["topology.kubernetes.io/zone"], labels["topology.kubernetes.io/region"]
    labels["failure-domain.beta.kubernetes.io/zone"] = "us-east-1c"
    info = decode_node(obj)
    assert (info.zone, info.region) == ("us-east-1c", "us-east-1")


@pytest.mark.parametrize(
    ("provider_id", "expected"),
    [("aws:///us-east-1a/i-1", "aws"), ("gce://p/z/n", "gcp"), ("azure:///subscriptions/x", "azure"),
     ("kind://docker/kind/kind-worker", "kind"), ("", None), (None, None), ("no-scheme", None)],
)
def test_provider_of(provider_id: str | None, expected: str | None) -> None:
    assert provider_of(provider_id) == expected


def test_pod_without_name_is_an_error() -> None:
    with pytest.raises(KeyError):
        decode_pod({"metadata": {}})
