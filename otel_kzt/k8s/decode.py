"""Raw Kubernetes JSON (dicts from `json.loads`) -> the few fields otel-kzt keeps.

Pods become `PodRecord`s (identity, workload, node, IPs), nodes become `NodeInfo`s. Nothing here goes through
the kubernetes client's generated models: at 150,000 pods they cost seconds and gigabytes. Repeated strings
(namespaces, node names, workload names) are interned so 100,000 pods share one copy of each.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from otel_kzt.k8s.model import Endpoint, NodeInfo
from otel_kzt.schema import (
    LABEL_POD_TEMPLATE_HASH,
    LABEL_REGION,
    LABEL_REGION_LEGACY,
    LABEL_ZONE,
    LABEL_ZONE_LEGACY,
    WorkloadKind,
)

_intern = sys.intern

# A CronJob names its Jobs "<cronjob>-<scheduled time in minutes since the epoch>" (8 digits since 1989,
# 9 digits only after the year 2160). A Job created by hand (`kubectl create job --from=cronjob/x x-manual`)
# does not match and stays a Job. The pod cannot see the Job's own owner, so the name is all we have.
_CRONJOB_JOB_NAME = re.compile(r"^(?P<cronjob>.+)-(?P<minutes>\d{8,10})$")

_DIRECT_OWNER_KINDS = {
    "StatefulSet": WorkloadKind.STATEFULSET,
    "DaemonSet": WorkloadKind.DAEMONSET,
}

# providerID scheme -> the provider names OpenTelemetry's `cloud.provider` uses.
_PROVIDER_SCHEMES = {"aws": "aws", "gce": "gcp", "azure": "azure"}

# Phases after which the kubelet has released the pod's IP; it may already belong to another pod.
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})

_NODE_ADDRESS_TYPES = frozenset({"InternalIP", "ExternalIP"})


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while one page of JSON is parsed and decoded.

    `json.loads` of a 500-pod page allocates ~50,000 containers that survive long enough to be promoted,
    so with 100,000 pods already decoded each page triggers full collections over everything we keep:
    the initial sync goes quadratic (9.6 s instead of 2.5 s for 100,000 pods, measured). Nothing we
    parse is cyclic, so reference counting frees it all; the pause is nested-safe across threads and
    restores the collector only if it was enabled when the first pauser came in.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


class PodRecord:
    """What the index keeps of one pod: its endpoint and the IPs it holds right now."""

    __slots__ = ("endpoint", "host_network", "ips", "uid")

    def __init__(self, uid: str, endpoint: Endpoint, ips: tuple[str, ...], host_network: bool) -> None:
        self.uid = uid
        self.endpoint = endpoint
        self.ips = ips  # empty when pending, finished, or host-network (those IPs are the node's)
        self.host_network = host_network

    def __repr__(self) -> str:
        return f"PodRecord(uid={self.uid!r}, endpoint={self.endpoint!r}, ips={self.ips!r})"


def canonical_ip(text: str) -> str | None:
    """The canonical text of an IP (`fd00:0::5` -> `fd00::5`), or None when `text` is not an IP."""
    try:
        return _intern(ipaddress.ip_address(text).compressed)
    except ValueError:
        return None


def resolve_workload(
    pod_name: str, labels: Mapping[str, str], owners: list[dict[str, Any]]
) -> tuple[WorkloadKind, str]:
    """The workload a pod belongs to, from its controller owner reference alone.

    ReplicaSet + `pod-template-hash` -> Deployment (the RS is named `<deployment>-<hash>`); Job named
    `<cronjob>-<minutes>` -> CronJob; StatefulSet, DaemonSet directly; no owner, or an owner kind we cannot
    map (static pods owned by their Node, custom controllers) -> the pod itself.
    """
    owner = _controller_owner(owners)
    if owner is None:
        return WorkloadKind.POD, pod_name
    kind = owner.get("kind")
    name = owner.get("name") or pod_name
    if kind == "ReplicaSet":
        template_hash = labels.get(LABEL_POD_TEMPLATE_HASH)
        if template_hash and name.endswith("-" + template_hash):
            return WorkloadKind.DEPLOYMENT, _intern(name[: -len(template_hash) - 1])
        return WorkloadKind.REPLICASET, _intern(name)
    if kind == "Job":
        match = _CRONJOB_JOB_NAME.match(name)
        if match:
            return WorkloadKind.CRONJOB, _intern(match.group("cronjob"))
        return WorkloadKind.JOB, _intern(name)
    direct = _DIRECT_OWNER_KINDS.get(kind or "")
    if direct is not None:
        return direct, _intern(name)
    return WorkloadKind.POD, pod_name


def _controller_owner(owners: list[dict[str, Any]]) -> dict[str, Any] | None:
    for owner in owners:
        if owner.get("controller"):
            return owner
    return owners[0] if owners else None


def decode_pod(obj: Mapping[str, Any]) -> PodRecord:
    """A raw Pod -> PodRecord. Raises KeyError/TypeError on an object without metadata.name/uid."""
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name: str = meta["name"]
    namespace = _intern(meta.get("namespace") or "default")
    uid: str = meta.get("uid") or f"{namespace}/{name}"
    kind, workload = resolve_workload(name, meta.get("labels") or {}, meta.get("ownerReferences") or [])
    node_name = spec.get("nodeName")
    endpoint = Endpoint(
        node_name=_intern(node_name) if node_name else None,
        workload_kind=kind,
        workload_name=workload,
        pod_name=name,
        namespace=namespace,
        pod_uid=uid,
    )
    host_network = bool(spec.get("hostNetwork"))
    ips: tuple[str, ...] = ()
    if not host_network and status.get("phase") not in _FINISHED_PHASES:
        ips = _pod_ips(status)
    return PodRecord(uid, endpoint, ips, host_network)


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    raw = [entry.get("ip") for entry in status.get("podIPs") or ()]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    ips = []
    for text in raw:
        ip = canonical_ip(text) if isinstance(text, str) else None
        if ip is not None and ip not in ips:
            ips.append(ip)
    return tuple(ips)


def decode_node(obj: Mapping[str, Any]) -> NodeInfo:
    """A raw Node -> NodeInfo: zone/region labels (legacy ones too), provider, IP addresses."""
    meta = obj["metadata"]
    labels = meta.get("labels") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    zone = labels.get(LABEL_ZONE) or labels.get(LABEL_ZONE_LEGACY)
    region = labels.get(LABEL_REGION) or labels.get(LABEL_REGION_LEGACY)
    addresses = []
    for entry in status.get("addresses") or ():
        if entry.get("type") not in _NODE_ADDRESS_TYPES:
            continue
        ip = canonical_ip(entry.get("address") or "")
        if ip is not None and ip not in addresses:
            addresses.append(ip)
    return NodeInfo(
        name=_intern(meta["name"]),
        zone=_intern(zone) if zone else None,
        region=_intern(region) if region else None,
        provider=provider_of(spec.get("providerID")),
        addresses=tuple(addresses),
    )


def provider_of(provider_id: str | None) -> str | None:
    """`aws:///us-east-1a/i-0a1b…` -> "aws", `gce://…` -> "gcp", `azure:///…` -> "azure"; other schemes
    (kind, openstack, …) are passed through as written; no providerID -> None."""
    if not provider_id or "://" not in provider_id:
        return None
    scheme = provider_id.split("://", 1)[0].lower()
    if not scheme:
        return None
    return _intern(_PROVIDER_SCHEMES.get(scheme, scheme))


def node_endpoint(name: str) -> Endpoint:
    """The endpoint a node address (or a host-network pod) resolves to."""
    return Endpoint(node_name=name, workload_kind=WorkloadKind.NODE, workload_name=name)
