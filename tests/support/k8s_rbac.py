"""Authentication and RBAC authorisation as kube-apiserver does them, for the test API server.

The rules come from the very manifests the deploy tests validate (every RBAC object of the files
`deploy/kustomization.yaml` lists: today `deploy/rbac.yaml`), plus the bootstrap roles
every real cluster binds to all authenticated users (`system:discovery`, `system:basic-user`,
`system:public-info-viewer`) and `cluster-admin` for `system:masters`. So what the agent and the enricher
may do in tests is exactly what the shipped manifests grant them in a cluster.

- Bearer tokens map to users; a ServiceAccount `ns/name` is the user `system:serviceaccount:ns:name` in the
  groups `system:serviceaccounts`, `system:serviceaccounts:ns`, `system:authenticated`. An unknown token is
  401; no token is `system:anonymous` (`system:unauthenticated`), as with anonymous auth enabled.
- A request's attributes (verb, API group, resource, subresource, namespace, name, or a non-resource path)
  are matched against the rules of every (Cluster)RoleBinding naming the user or one of its groups. A list
  or watch with `fieldSelector=metadata.name=X` is authorised with the name X, as kube-apiserver does.
- A refusal is the `Status` the real server writes, message and details included.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RBAC_FILE = DEPLOY / "rbac.yaml"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
# What the authoriser reads from a manifest set: identities, roles and their bindings.
RBAC_KINDS = frozenset({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
ADMIN_USER = "kubernetes-admin"

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class User:
    name: str
    groups: tuple[str, ...]


ANONYMOUS = User("system:anonymous", ("system:unauthenticated",))
ADMIN = User(ADMIN_USER, ("system:masters", "system:authenticated"))


def service_account_user(namespace: str, name: str) -> User:
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


@dataclass(frozen=True, slots=True)
class Request:
    """The attributes kube-apiserver's authoriser sees (`authorizer.Attributes`)."""

    verb: str
    path: str
    resource: str = ""  # "" for a non-resource request (/version, /apis ...)
    group: str = ""
    version: str = "v1"
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def is_resource(self) -> bool:
        return bool(self.resource)


def _role(name: str, rules: list[Obj]) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": rules,
    }


def _binding(name: str, groups: list[str]) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g} for g in groups],
    }


_PUBLIC_PATHS = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
# The bootstrap policy of kube-apiserver (plugin/pkg/auth/authorizer/rbac/bootstrappolicy), as it applies to
# reading: what every account can do without any RBAC of its own.
BOOTSTRAP: tuple[Obj, ...] = (
    _role(
        "system:discovery",
        [
            {
                "nonResourceURLs": [
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/openapi",
                    "/openapi/*",
                    *_PUBLIC_PATHS,
                ],
                "verbs": ["get"],
            }
        ],
    ),
    _binding("system:discovery", ["system:authenticated"]),
    _role(
        "system:basic-user",
        [
            {
                "apiGroups": ["authorization.k8s.io"],
                "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                "verbs": ["create"],
            },
            {
                "apiGroups": ["authentication.k8s.io"],
                "resources": ["selfsubjectreviews"],
                "verbs": ["create"],
            },
        ],
    ),
    _binding("system:basic-user", ["system:authenticated"]),
    _role("system:public-info-viewer", [{"nonResourceURLs": _PUBLIC_PATHS, "verbs": ["get"]}]),
    _binding("system:public-info-viewer", ["system:authenticated", "system:unauthenticated"]),
    _role(
        "cluster-admin",
        [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ],
    ),
    _binding("cluster-admin", ["system:masters"]),
)


def load_manifest(path: Path = RBAC_FILE) -> list[Obj]:
    """Every object of a multi-document YAML file (deploy/rbac.yaml by default)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def shipped_objects(kustomization: Path = KUSTOMIZATION) -> list[Obj]:
    """The RBAC objects `kubectl apply -k deploy/` creates: those of every file the kustomization lists,
    in its order, with its `namespace:` set on namespaced ones as kustomize does. Whatever file of the
    deployment a role or binding is moved to, the API server enforces it."""
    spec = yaml.safe_load(kustomization.read_text()) or {}
    namespace = spec.get("namespace")
    out: list[Obj] = []
    for resource in spec.get("resources") or ():
        for obj in load_manifest(kustomization.parent / resource):
            if obj.get("kind") not in RBAC_KINDS:
                continue
            if namespace and obj["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
                obj["metadata"]["namespace"] = namespace
            out.append(obj)
    return out


class Rbac:
    """ServiceAccounts, roles and bindings; `authorize()` answers as the RBAC authoriser does."""

    def __init__(self, objects: Iterable[Mapping[str, Any]], *, bootstrap: bool = True) -> None:
        self.objects: list[Obj] = [copy.deepcopy(dict(o)) for o in objects]
        every = [*self.objects, *(copy.deepcopy(BOOTSTRAP) if bootstrap else ())]
        self._roles = {
            (o["metadata"].get("namespace", ""), o["kind"], o["metadata"]["name"]): o
            for o in every
            if o["kind"] in ("ClusterRole", "Role")
        }
        self._bindings = [o for o in every if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
        self.service_accounts = {
            (o["metadata"]["namespace"], o["metadata"]["name"])
            for o in self.objects
            if o["kind"] == "ServiceAccount"
        }

    @classmethod
    def shipped(cls) -> Rbac:
        """What the deployment (`kubectl apply -k deploy/`) grants, read afresh."""
        return cls(shipped_objects())

    def without(self, role: str, resource: str) -> Rbac:
        """A copy whose ClusterRole `role` no longer grants `resource` (rules left empty are dropped)."""
        objects = copy.deepcopy(self.objects)
        found = False
        for obj in objects:
            if obj["kind"] == "ClusterRole" and obj["metadata"]["name"] == role:
                for rule in obj.get("rules") or ():
                    found |= resource in rule.get("resources", ())
                    rule["resources"] = [r for r in rule.get("resources", ()) if r != resource]
                obj["rules"] = [
                    r for r in obj.get("rules") or () if r.get("resources") or r.get("nonResourceURLs")
                ]
        if not found:
            raise KeyError(f"ClusterRole {role} grants no {resource}")
        return Rbac(objects)

    def granted(self, role: str) -> list[tuple[str, str]]:
        """(API group, resource) pairs the ClusterRole `role` grants, in file order."""
        pairs: list[tuple[str, str]] = []
        for (_, kind, name), obj in self._roles.items():
            if kind == "ClusterRole" and name == role:
                for rule in obj.get("rules") or ():
                    pairs += [(g, r) for g in rule.get("apiGroups", ()) for r in rule.get("resources", ())]
        return pairs

    def authorize(self, user: User, request: Request) -> tuple[bool, str]:
        """(allowed, reason). The reason names missing roles, as the RBAC authoriser appends them."""
        missing: list[str] = []
        for binding in self._bindings:
            binding_ns = binding["metadata"].get("namespace", "")
            if binding_ns and binding_ns != request.namespace:
                continue  # a RoleBinding grants in its own namespace only
            if not any(_names(subject, user, binding_ns) for subject in binding.get("subjects") or ()):
                continue
            ref = binding["roleRef"]
            role = self._roles.get((binding_ns if ref["kind"] == "Role" else "", ref["kind"], ref["name"]))
            if role is None:
                kind = "clusterrole" if ref["kind"] == "ClusterRole" else "role"
                missing.append(f'{kind}.rbac.authorization.k8s.io "{ref["name"]}" not found')
                continue
            if any(_allows(rule, request) for rule in role.get("rules") or ()):
                return True, ""
        return False, ("RBAC: " + ", ".join(missing)) if missing else ""


def _names(subject: Mapping[str, Any], user: User, binding_ns: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_ns
        return user.name == f"system:serviceaccount:{namespace}:{name}"
    if kind == "User":
        return user.name == name
    return kind == "Group" and name in user.groups


def _allows(rule: Mapping[str, Any], request: Request) -> bool:
    verbs = rule.get("verbs") or ()
    if request.verb not in verbs and "*" not in verbs:
        return False
    if not request.is_resource:
        return any(_path_matches(pattern, request.path) for pattern in rule.get("nonResourceURLs") or ())
    groups = rule.get("apiGroups") or ()
    if request.group not in groups and "*" not in groups:
        return False
    resources = rule.get("resources") or ()
    wanted = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
    if not (
        {wanted, "*"} & set(resources) or (request.subresource and f"*/{request.subresource}" in resources)
    ):
        return False
    names = rule.get("resourceNames") or ()
    return not names or request.name in names


def _path_matches(pattern: str, path: str) -> bool:
    return pattern in ("*", path) or (pattern.endswith("*") and path.startswith(pattern[:-1]))


def forbidden(user: User, request: Request, reason: str) -> bytes:
    """The 403 `Status` kube-apiserver writes (responsewriters.Forbidden + apierrors.NewForbidden)."""
    if not request.is_resource:
        text = f'User "{user.name}" cannot {request.verb} path "{request.path}"'
    else:
        resource = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
        scope = f'in the namespace "{request.namespace}"' if request.namespace else "at the cluster scope"
        text = (
            f'User "{user.name}" cannot {request.verb} resource "{resource}" in API group '
            f'"{request.group}" {scope}'
        )
    if reason:
        text = f"{text}: {reason}"
    details: Obj = {}
    if not request.is_resource:
        message = f"forbidden: {text}"
    else:
        qualified = f"{request.resource}.{request.group}" if request.group else request.resource
        named = f' "{request.name}"' if request.name else ""
        message = f"{qualified}{named} is forbidden: {text}"
        details = {
            k: v
            for k, v in (("name", request.name), ("group", request.group), ("kind", request.resource))
            if v
        }
    return status(403, "Forbidden", message, details)


def status(code: int, reason: str, message: str, details: Obj | None = None) -> bytes:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        body["details"] = details
    body["code"] = code
    return json.dumps(body).encode()


UNAUTHORIZED = status(401, "Unauthorized", "Unauthorized")


class Tokens:
    """Bearer tokens, as the TokenRequest API hands them out: one per ServiceAccount, plus an admin."""

    def __init__(self, service_accounts: Iterable[tuple[str, str]]) -> None:
        self._users: dict[str, User] = {}
        self._by_account: dict[tuple[str, str], str] = {}
        for namespace, name in sorted(service_accounts):
            token = f"sa.{namespace}.{name}.{secrets.token_hex(8)}"
            self._by_account[(namespace, name)] = token
            self._users[token] = service_account_user(namespace, name)
        self.admin = f"admin.{secrets.token_hex(8)}"
        self._users[self.admin] = ADMIN

    def token(self, namespace: str, name: str) -> str:
        """The token of an existing ServiceAccount (KeyError for one the manifests do not create)."""
        return self._by_account[(namespace, name)]

    def rotate(self, namespace: str, name: str) -> str:
        """A new token for the ServiceAccount; the old one is refused from now on (KeyError: no account)."""
        old = self._by_account[(namespace, name)]
        new = f"sa.{namespace}.{name}.{secrets.token_hex(8)}"
        self._users[new] = self._users.pop(old)
        self._by_account[(namespace, name)] = new
        return new

    def user(self, authorization: str | None) -> User | None:
        """The user an `Authorization` header names; ANONYMOUS without one; None for a bad token (401)."""
        if not authorization:
            return ANONYMOUS
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._users.get(token.strip())
