"""Kubernetes metadata for the simulated cluster: a `List` of Nodes, Pods, Services and EndpointSlices.

The objects look like the ones a GKE (or EKS) cluster returns (`kubectl get nodes,pods -A -o yaml`): zone
and region labels, `gce://<project>/<zone>/<name>` (`aws:///<zone>/<instance>`) provider IDs, InternalIP
addresses; pods with ownerReferences (a ReplicaSet plus the pod-template-hash label for Deployments, the
StatefulSet, the DaemonSet), nodeName, hostNetwork, dual-stack podIPs, phase Running; the story's Services
and EndpointSlices (services.py). Agents and the
enricher read the file with `--kube-metadata`, exactly as they would read a real cluster's dump.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from otel_kzt.demo.cluster import Cluster, NodeSpec, PodSpec
from otel_kzt.demo.services import ServiceSpec
from otel_kzt.demo.services import objects as service_objects
from otel_kzt.schema import LABEL_POD_TEMPLATE_HASH, LABEL_REGION, LABEL_ZONE, WorkloadKind

CREATED = "2026-11-22T08:00:00Z"
KUBELET_VERSION = "v1.34.2"


def _uid(kind: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"otel-kzt-demo/{kind}/{name}"))


def node_object(node: NodeSpec) -> dict[str, Any]:
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": node.name,
        "node.kubernetes.io/instance-type": node.instance_type,
        LABEL_ZONE: node.zone,
        LABEL_REGION: node.region,
    }
    if node.provider_id.startswith("gce://"):
        labels["cloud.google.com/gke-nodepool"] = "demo-pool"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "uid": _uid("node", node.name), "resourceVersion": "1000",
                     "creationTimestamp": CREATED, "labels": labels},
        "spec": {"providerID": node.provider_id},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.v4},
                {"type": "InternalIP", "address": node.v6},
                {"type": "Hostname", "address": node.name},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastTransitionTime": CREATED}],
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "architecture": "amd64",
                "operatingSystem": "linux", "containerRuntimeVersion": "containerd://1.7.24",
                "kernelVersion": os.uname().release, "osImage": "Container-Optimized OS from Google",
                "machineID": _uid("machine", node.name).replace("-", ""),
                "systemUUID": _uid("system", node.name), "bootID": _uid("boot", node.name),
            },
        },
    }


def _owner(pod: PodSpec) -> tuple[dict[str, Any], dict[str, str]]:
    """The controller ownerReference of a pod and the labels its controller puts on it."""
    if pod.workload_kind is WorkloadKind.DEPLOYMENT:
        owner_kind, owner_name = "ReplicaSet", f"{pod.workload_name}-{pod.template_hash}"
        extra = {LABEL_POD_TEMPLATE_HASH: pod.template_hash or ""}
    elif pod.workload_kind is WorkloadKind.STATEFULSET:
        owner_kind, owner_name = "StatefulSet", pod.workload_name
        extra = {"statefulset.kubernetes.io/pod-name": pod.name,
                 "apps.kubernetes.io/pod-index": pod.name.rsplit("-", 1)[-1]}
    else:
        owner_kind, owner_name = pod.workload_kind.value, pod.workload_name
        extra = {"controller-revision-hash": "7c9d8f6b5"}
    ref = {"apiVersion": "apps/v1", "kind": owner_kind, "name": owner_name,
           "uid": _uid(owner_kind, f"{pod.namespace}/{owner_name}"), "controller": True,
           "blockOwnerDeletion": True}
    return ref, extra


def pod_object(pod: PodSpec) -> dict[str, Any]:
    ref, extra_labels = _owner(pod)
    spec: dict[str, Any] = {
        "nodeName": pod.node.name,
        "restartPolicy": "Always",
        "dnsPolicy": "ClusterFirstWithHostNet" if pod.host_network else "ClusterFirst",
        "containers": [{
            "name": pod.app,
            "image": f"registry.example/{pod.app}:1.0.0",
            "ports": [{"containerPort": port, "protocol": "TCP"} for port in pod.ports],
        }],
    }
    if pod.host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "resourceVersion": "1000",
            "creationTimestamp": CREATED,
            "labels": {"app.kubernetes.io/name": pod.app, **extra_labels},
            "ownerReferences": [ref],
        },
        "spec": spec,
        "status": {
            "phase": "Running",
            "hostIP": pod.node.v4,
            "hostIPs": [{"ip": pod.node.v4}, {"ip": pod.node.v6}],
            "podIP": pod.v4,
            "podIPs": [{"ip": pod.v4}, {"ip": pod.v6}],
            "startTime": CREATED,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": CREATED}],
            "containerStatuses": [{
                "name": pod.app, "ready": True, "restartCount": 0, "started": True,
                "image": f"registry.example/{pod.app}:1.0.0",
                "imageID": f"registry.example/{pod.app}@sha256:{_uid('image', pod.app).replace('-', '') * 2}",
                "containerID": f"containerd://{_uid('container', pod.uid).replace('-', '') * 2}",
                "state": {"running": {"startedAt": CREATED}},
            }],
        },
    }


def cluster_list(cluster: Cluster, services: tuple[ServiceSpec, ...] = ()) -> dict[str, Any]:
    items = [node_object(n) for n in cluster.nodes] + [pod_object(p) for p in cluster.pods]
    items += service_objects(cluster, services)
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}


def write(cluster: Cluster, path: Path, services: tuple[ServiceSpec, ...] = ()) -> Path:
    """Write the List as JSON (valid YAML too), atomically: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(cluster_list(cluster, services), indent=2) + "\n")
    os.replace(tmp, path)
    return path
