"""What the test API server serves, and how a request path becomes the attributes RBAC authorises.

The resource table (group, version, kind, scope, field selectors a real server supports for it) and
`request_info`, the counterpart of kube-apiserver's RequestInfoResolver: `/api/v1/namespaces/shop/pods`
with `watch=1` is a `watch` of `pods` in namespace `shop`; `/version` is a non-resource `get`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.support.k8s_rbac import Request

Obj = Mapping[str, Any]


def _meta(obj: Obj, key: str) -> str:
    return str((obj.get("metadata") or {}).get(key) or "")


_COMMON: dict[str, Callable[[Obj], str]] = {
    "metadata.name": lambda o: _meta(o, "name"),
    "metadata.namespace": lambda o: _meta(o, "namespace"),
}


@dataclass(frozen=True, slots=True)
class ResourceType:
    name: str  # plural, as in URLs and RBAC rules
    kind: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True
    singular: str = ""
    fields: Mapping[str, Callable[[Obj], str]] = field(default_factory=dict)  # beyond metadata.*

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def selectable(self) -> dict[str, Callable[[Obj], str]]:
        return {**_COMMON, **self.fields}

    def field_values(self, obj: Obj) -> tuple[tuple[str, str], ...]:
        """The values of every selectable field, computed once when an object is stored."""
        return tuple((name, get(obj)) for name, get in self.selectable().items())


RESOURCES: dict[str, ResourceType] = {
    r.name: r
    for r in (
        ResourceType(
            "pods",
            "Pod",
            singular="pod",
            fields={
                "spec.nodeName": lambda o: str((o.get("spec") or {}).get("nodeName") or ""),
                "status.phase": lambda o: str((o.get("status") or {}).get("phase") or ""),
            },
        ),
        ResourceType("nodes", "Node", namespaced=False, singular="node"),
        ResourceType("services", "Service", singular="service"),
        ResourceType(
            "endpointslices",
            "EndpointSlice",
            group="discovery.k8s.io",
            singular="endpointslice",
            fields={"addressType": lambda o: str(o.get("addressType") or "")},
        ),
    )
}
KINDS = {r.kind: r.name for r in RESOURCES.values()}
GROUP_VERSIONS = {(r.group, r.version) for r in RESOURCES.values()}
# Served for every account's basic rights (system:basic-user): the review a client sends to ask "can I?".
REVIEW_GROUP = ("authorization.k8s.io", "v1")


def _truthy(value: str | None) -> bool:
    return value in ("1", "true", "True")


def selector_name(selector: str) -> str:
    """X of a selector that requires `metadata.name=X` exactly (kube-apiserver authorises lists by it)."""
    for term in filter(None, selector.split(",")):
        key, sep, value = term.partition("==") if "==" in term else term.partition("=")
        if sep and "!" not in key and key.strip() == "metadata.name":
            return value.strip()
    return ""


def request_info(method: str, path: str, query: Mapping[str, str]) -> Request:
    """The authoriser's view of a request (paths outside /api/v1/... and /apis/g/v/... are non-resource)."""
    parts = [p for p in path.split("/") if p]
    verb_of = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    verb = verb_of.get(method, method.lower())
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return Request(verb=verb, path="/" + "/".join(parts) if parts else "/")
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    elif rest[0] == "namespaces" and len(rest) == 2:
        namespace = rest[1]  # the Namespace object itself
    resource, name, subresource = rest[0], rest[1] if len(rest) > 1 else "", "/".join(rest[2:])
    if method == "GET":
        if name:
            verb = "watch" if _truthy(query.get("watch")) else "get"
        else:
            verb = "watch" if _truthy(query.get("watch")) else "list"
            name = selector_name(query.get("fieldSelector", ""))
    elif method == "DELETE" and not name:
        verb = "deletecollection"
    return Request(
        verb=verb,
        path=path,
        resource=resource,
        group=group,
        version=version,
        subresource=subresource,
        namespace=namespace,
        name=name,
    )
