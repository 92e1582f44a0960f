"""The discovery documents and `/version` of the test API server, shaped as kube-apiserver writes them.

Clients (kubectl, the kubernetes client's dynamic discovery) read `/api`, `/apis`, `/api/v1` and
`/apis/<group>/<version>` to learn what is served; every authenticated account may (system:discovery).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.support.k8s_resources import GROUP_VERSIONS, RESOURCES, REVIEW_GROUP

_VERBS = ["get", "list", "watch"]


def version_info(git_version: str) -> dict[str, str]:
    """`/version` for e.g. `v1.34.1` or an EKS-style `v1.30.4-eks-a737599` (minor "30+", as EKS writes)."""
    match = re.match(r"v(\d+)\.(\d+)\.(\d+)(.*)", git_version)
    if match is None:
        raise ValueError(f"not a Kubernetes version: {git_version}")
    major, minor, _, suffix = match.groups()
    return {
        "major": major,
        "minor": minor + ("+" if suffix else ""),
        "emulationMajor": major,
        "emulationMinor": minor,
        "gitVersion": git_version,
        "gitCommit": "0" * 40,
        "gitTreeState": "clean",
        "buildDate": "2025-09-09T19:44:50Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _group(name: str, version: str) -> dict[str, Any]:
    gv = {"groupVersion": f"{name}/{version}", "version": version}
    return {"name": name, "versions": [gv], "preferredVersion": gv}


def _groups() -> list[tuple[str, str]]:
    return sorted({*(gv for gv in GROUP_VERSIONS if gv[0]), REVIEW_GROUP})


def document(path: str, server_address: str) -> bytes | None:
    """The discovery document at `path` (/api, /apis, /api/v1, /apis/<g>[/<v>]), or None if none."""
    parts = [p for p in path.split("/") if p]
    body: dict[str, Any] | None = None
    if parts == ["api"]:
        body = {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        }
    elif parts == ["apis"]:
        body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g, v) for g, v in _groups()]}
    elif len(parts) == 2 and parts[0] == "apis" and any(g == parts[1] for g, _ in _groups()):
        version = next(v for g, v in _groups() if g == parts[1])
        body = {"kind": "APIGroup", "apiVersion": "v1", **_group(parts[1], version)}
    elif parts == ["api", "v1"]:
        body = _resource_list("", "v1")
    elif (
        len(parts) == 3
        and parts[0] == "apis"
        and ((parts[1], parts[2]) in GROUP_VERSIONS or (parts[1], parts[2]) == REVIEW_GROUP)
    ):
        body = _resource_list(parts[1], parts[2])
    return None if body is None else json.dumps(body).encode()


def _resource_list(group: str, version: str) -> dict[str, Any]:
    if (group, version) == REVIEW_GROUP:
        resources = [
            {
                "name": "selfsubjectaccessreviews",
                "singularName": "selfsubjectaccessreview",
                "namespaced": False,
                "kind": "SelfSubjectAccessReview",
                "verbs": ["create"],
            }
        ]
    else:
        resources = [
            {
                "name": r.name,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": _VERBS,
            }
            for r in RESOURCES.values()
            if (r.group, r.version) == (group, version)
        ]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }
