"""The test API server authenticates and authorises as kube-apiserver does, from deploy/rbac.yaml itself.

Through the real `kubernetes` client: 401 for unknown tokens, the components' ServiceAccounts allowed
exactly what the shipped ClusterRoles grant, the real 403 Status for the rest, the bootstrap grants
every account has (discovery, /version, "can I?" reviews), and list/watch authorised by a
`metadata.name` field selector as the real authoriser does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from tests.integration import deploy_files as df
from tests.support.k8s_apiserver import ADMIN, AGENT, ENRICHER, FakeApiServer
from tests.support.k8s_objects import make_node, make_pod
from tests.support.k8s_rbac import RBAC_FILE, RBAC_KINDS, Rbac, load_manifest, shipped_objects

READ = ("get", "list", "watch")
WRITE = ("create", "update", "patch", "delete", "deletecollection")


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.add_many([make_node("n1", ["10.1.0.1"]), make_pod("web-1", "n1", ["10.2.0.1"])])
        yield server


def raw_client(api: FakeApiServer, token: str | None) -> k8s_client.ApiClient:
    configuration = k8s_client.Configuration(host=api.url)
    if token is not None:
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    return k8s_client.ApiClient(configuration)


def refused(call: object, *args: object, **kwargs: object) -> tuple[int, dict[str, object]]:
    with pytest.raises(ApiException) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return int(info.value.status), json.loads(info.value.body)


def can_i(api_client: k8s_client.ApiClient, verb: str, resource: str, group: str = "") -> bool:
    review = k8s_client.V1SelfSubjectAccessReview(
        spec=k8s_client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=k8s_client.V1ResourceAttributes(verb=verb, resource=resource, group=group)
        )
    )
    answer = k8s_client.AuthorizationV1Api(api_client).create_self_subject_access_review(review)
    return bool(answer.status.allowed)


def test_one_source_of_truth() -> None:
    """The rules enforced are the objects the deploy tests validate, read from the same files: every RBAC
    object of the deployment, wherever it sits, and none the kustomization leaves out."""
    assert df.DEPLOY / "rbac.yaml" == RBAC_FILE
    validated = [o for o in df.objects() if o["kind"] in RBAC_KINDS]
    assert Rbac.shipped().objects == validated == shipped_objects()
    assert [o for o in df.objects(RBAC_FILE)] == load_manifest() == validated  # all in rbac.yaml today
    listed = {df.DEPLOY / r for r in yaml.safe_load(df.KUSTOMIZATION.read_text())["resources"]}
    assert set(df.manifest_files()) == listed  # the deploy tests see exactly what kubectl apply -k applies


def test_the_enforced_rbac_grants_exactly_what_the_deploy_tests_validate(tmp_path: Path) -> None:
    """Asked of the enforcing server through each component's own token: what its ClusterRole in the
    manifests lists is allowed, the same resource one verb or group off is not."""
    with FakeApiServer() as api:
        for account in (AGENT, ENRICHER):
            role = df.get("ClusterRole", account[1])
            with api.client(tmp_path / account[1], account) as api_client:
                for rule in role["rules"]:
                    for group in rule["apiGroups"]:
                        for resource in rule["resources"]:
                            assert all(can_i(api_client, v, resource, group) for v in rule["verbs"])
                            assert not can_i(api_client, "patch", resource, group), resource
                            assert not can_i(api_client, "list", resource, "other.example.com"), resource


def test_unknown_token_is_401_and_no_token_is_anonymous(api: FakeApiServer) -> None:
    with raw_client(api, "not-a-token") as bad:
        code, body = refused(k8s_client.CoreV1Api(bad).list_node)
    assert code == 401 and body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    with raw_client(api, None) as anonymous:
        assert k8s_client.VersionApi(anonymous).get_code().git_version == api.git_version  # public info
        code, body = refused(k8s_client.CoreV1Api(anonymous).list_pod_for_all_namespaces)
    assert code == 403 and "system:anonymous" in str(body["message"])
    assert api.refusals[0] == "401 GET /api/v1/nodes"


def test_forbidden_is_the_real_status(api: FakeApiServer, tmp_path: Path) -> None:
    with api.client(tmp_path / "agent", AGENT) as agent:
        code, body = refused(k8s_client.CoreV1Api(agent).list_config_map_for_all_namespaces)
        assert code == 403
        assert body == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'configmaps is forbidden: User "system:serviceaccount:otel-kzt:otel-kzt-agent" cannot '
            'list resource "configmaps" in API group "" at the cluster scope',
            "reason": "Forbidden",
            "details": {"kind": "configmaps"},
            "code": 403,
        }
        _, named = refused(k8s_client.CoreV1Api(agent).read_namespaced_secret, "token", "shop")
        assert named["message"] == (
            'secrets "token" is forbidden: User "system:serviceaccount:otel-kzt:otel-kzt-agent" cannot get '
            'resource "secrets" in API group "" in the namespace "shop"'
        )
        assert named["details"] == {"name": "token", "kind": "secrets"}
        _, grouped = refused(k8s_client.AppsV1Api(agent).list_deployment_for_all_namespaces, watch=True)
        assert grouped["message"].startswith(
            'deployments.apps is forbidden: User "system:serviceaccount:'
            'otel-kzt:otel-kzt-agent" cannot watch resource "deployments" '
            'in API group "apps" at the cluster scope'
        )
    assert "403 list configmaps system:serviceaccount:otel-kzt:otel-kzt-agent" in api.refusals


@pytest.mark.parametrize("account", [AGENT, ENRICHER], ids=["agent", "enricher"])
def test_components_may_read_what_they_are_granted_and_write_nothing(
    api: FakeApiServer, tmp_path: Path, account: tuple[str, str]
) -> None:
    granted = Rbac.shipped().granted(account[1])
    assert ("", "pods") in granted and ("", "nodes") in granted
    with api.client(tmp_path / "kubeconfig", account) as api_client:
        core = k8s_client.CoreV1Api(api_client)
        assert [p.metadata.name for p in core.list_pod_for_all_namespaces().items] == ["web-1"]
        assert core.read_node("n1").metadata.name == "n1"
        for group, resource in granted:
            assert all(can_i(api_client, verb, resource, group) for verb in READ), resource
            assert not any(can_i(api_client, verb, resource, group) for verb in WRITE), resource
        for resource in ("secrets", "configmaps", "serviceaccounts"):
            assert not can_i(api_client, "get", resource)
        assert not can_i(api_client, "list", "clusterroles", "rbac.authorization.k8s.io")


def test_every_account_gets_discovery(api: FakeApiServer, tmp_path: Path) -> None:
    with api.client(tmp_path / "agent", AGENT) as agent:
        assert k8s_client.CoreApi(agent).get_api_versions().versions == ["v1"]
        groups = {g.name for g in k8s_client.ApisApi(agent).get_api_versions().groups}
        assert "discovery.k8s.io" in groups
        core = {r.name for r in k8s_client.CoreV1Api(agent).get_api_resources().resources}
        assert {"pods", "nodes", "services"} <= core
        slices = k8s_client.DiscoveryV1Api(agent).get_api_resources().resources
        assert [r.name for r in slices] == ["endpointslices"]
        version = k8s_client.VersionApi(agent).get_code()
        assert (version.major, version.minor, version.git_version) == ("1", "34", "v1.34.1")


def test_list_and_watch_are_authorised_by_a_name_selector(tmp_path: Path) -> None:
    """A role naming one node allows a list/watch selecting it by name, never an unqualified one."""
    objects = load_manifest()
    for obj in objects:
        if obj["kind"] == "ClusterRole" and obj["metadata"]["name"] == "otel-kzt-agent":
            obj["rules"] = [
                {"apiGroups": [""], "resources": ["nodes"], "resourceNames": ["n1"], "verbs": list(READ)}
            ]
    with FakeApiServer(rbac=Rbac(objects)) as api, api.client(tmp_path / "agent", AGENT) as agent:
        api.add(make_node("n1", ["10.1.0.1"]))
        core = k8s_client.CoreV1Api(agent)
        assert [n.metadata.name for n in core.list_node(field_selector="metadata.name=n1").items] == ["n1"]
        assert core.read_node("n1").metadata.name == "n1"
        code, body = refused(core.list_node)
        assert code == 403 and 'cannot list resource "nodes"' in str(body["message"])
        code, _ = refused(core.list_node, field_selector="metadata.name=n2")
        assert code == 403


def test_a_binding_to_a_missing_role_says_so(tmp_path: Path) -> None:
    objects = [
        o
        for o in load_manifest()
        if not (o["kind"] == "ClusterRole" and o["metadata"]["name"] == "otel-kzt-agent")
    ]
    with FakeApiServer(rbac=Rbac(objects)) as api, api.client(tmp_path / "agent", AGENT) as agent:
        _, body = refused(k8s_client.CoreV1Api(agent).list_node)
    assert str(body["message"]).endswith(
        'at the cluster scope: RBAC: clusterrole.rbac.authorization.k8s.io "otel-kzt-agent" not found'
    )


def test_rules_change_at_once_and_tokens_stay_valid(api: FakeApiServer, tmp_path: Path) -> None:
    with api.client(tmp_path / "enricher", ENRICHER) as enricher:
        core = k8s_client.CoreV1Api(enricher)
        assert core.list_node().items
        api.set_rbac(Rbac.shipped().without("otel-kzt-enricher", "nodes"))
        assert refused(core.list_node)[0] == 403
        assert core.list_pod_for_all_namespaces().items  # pods still granted
        api.set_rbac(Rbac.shipped())
        assert core.list_node().items
    with api.client(tmp_path / "admin", ADMIN) as admin:
        assert can_i(admin, "delete", "secrets")  # system:masters: cluster-admin
    with pytest.raises(KeyError):
        api.token(("otel-kzt", "no-such-account"))  # tokens exist only for ServiceAccounts of the RBAC


def test_a_rotated_token_replaces_the_old_one(api: FakeApiServer) -> None:
    old = api.token(ENRICHER)
    new = api.rotate_token(ENRICHER)
    assert new != old and api.token(ENRICHER) == new and api.token(AGENT) != new
    with raw_client(api, old) as stale:
        assert refused(k8s_client.CoreV1Api(stale).list_node)[0] == 401
    with raw_client(api, new) as fresh:  # the same account: the same rules
        assert len(k8s_client.CoreV1Api(fresh).list_node().items) == len(api.objects("Node"))
        assert refused(k8s_client.CoreV1Api(fresh).list_namespaced_secret, "otel-kzt")[0] == 403
