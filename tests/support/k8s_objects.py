"""Realistic Pod and Node objects for tests and benchmarks, built from the fixtures in tests/fixtures/k8s/.

Each builder deep-copies a real object (managed fields, containers, conditions …) and changes only what a
test cares about, so the API server and the file source are fed what a real cluster would give them.
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"


@functools.cache
def fixture(name: str) -> dict[str, Any]:
    """A fixture object by file stem (`pod-deployment`, `node-eks` …); callers get a fresh copy."""
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def fresh(name: str) -> dict[str, Any]:
    return copy.deepcopy(fixture(name))


def make_node(
    name: str,
    addresses: list[str],
    *,
    zone: str | None = "us-east-1a",
    region: str | None = "us-east-1",
    provider_id: str | None = None,
    legacy_labels: bool = False,
) -> dict[str, Any]:
    """An EKS-shaped Node with the given name, InternalIP addresses and zone labels."""
    node = fresh("node-eks")
    meta = node["metadata"]
    meta["name"] = name
    meta["uid"] = str(uuid.uuid4())
    labels = {k: v for k, v in meta["labels"].items() if "topology" not in k and "failure-domain" not in k}
    labels["kubernetes.io/hostname"] = name
    prefix = "failure-domain.beta.kubernetes.io" if legacy_labels else "topology.kubernetes.io"
    if zone is not None:
        labels[f"{prefix}/zone"] = zone
    if region is not None:
        labels[f"{prefix}/region"] = region
    meta["labels"] = labels
    if provider_id is None:
        node["spec"].pop("providerID", None)
    else:
        node["spec"]["providerID"] = provider_id
    node["status"]["addresses"] = [{"type": "InternalIP", "address": a} for a in addresses] + [
        {"type": "Hostname", "address": name}
    ]
    return node


def make_pod(
    name: str,
    node: str | None,
    ips: list[str],
    *,
    namespace: str = "shop",
    owner: tuple[str, str] | None = ("ReplicaSet", "checkout-6d5f9c7b8d"),
    template_hash: str | None = "6d5f9c7b8d",
    host_network: bool = False,
    phase: str = "Running",
    uid: str | None = None,
) -> dict[str, Any]:
    """A Deployment-shaped Pod (containers, conditions …) with the given identity, owner and IPs."""
    pod = fresh("pod-deployment")
    meta = pod["metadata"]
    meta["name"] = name
    meta["namespace"] = namespace
    meta["uid"] = uid or str(uuid.uuid4())
    labels = dict(meta["labels"])
    labels.pop("pod-template-hash", None)
    if template_hash is not None:
        labels["pod-template-hash"] = template_hash
    meta["labels"] = labels
    if owner is None:
        meta.pop("ownerReferences", None)
    else:
        ref = meta["ownerReferences"][0]
        ref["kind"], ref["name"] = owner
        ref["apiVersion"] = "batch/v1" if owner[0] == "Job" else "apps/v1"
        ref["uid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{owner[0]}/{owner[1]}"))
    spec = pod["spec"]
    if node is None:
        spec.pop("nodeName", None)
    else:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status = pod["status"]
    status["phase"] = phase
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    else:
        status.pop("podIP", None)
        status.pop("podIPs", None)
    return pod


def as_list(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """A `kind: List` exactly as `kubectl get nodes,pods -A -o json` prints it."""
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": objects}
