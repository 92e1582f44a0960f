"""The security settings of deploy/ are exactly what the design promises, no more.

Agent: not privileged, host network, exactly BPF + PERFMON + NET_ADMIN + SYS_RESOURCE on nothing,
read-only root, only the bpffs and BTF host paths. Enricher: non-root, no capability at all, read-only
root. RBAC: get/list/watch on pods + nodes (agent, enricher), nothing else.
"""

from __future__ import annotations

from typing import Any

import pytest

from otel_kzt.agent.config import DEFAULT_HEALTH_ENDPOINT
from otel_kzt.serving.limits import split_host_port
from tests.integration import deploy_files as df

# no SYSLOG: see otel_kzt/agent/datapath/bpf/netfilter.c
AGENT_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}
READ_VERBS = ["get", "list", "watch"]


def _agent() -> df.Obj:
    return df.get("DaemonSet", "otel-kzt-agent")


def _enricher() -> df.Obj:
    return df.get("Deployment", "otel-kzt-enricher")


def _workloads() -> list[df.Obj]:
    return [_agent(), _enricher()]


def test_agent_pod_is_host_network_but_shares_nothing_else() -> None:
    spec = df.pod_spec(_agent())
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # else the enricher's name does not resolve
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "otel-kzt-agent"


def test_agent_runs_on_every_node() -> None:
    tolerations = df.pod_spec(_agent())["tolerations"]
    # An empty key with operator Exists tolerates every taint, NoExecute included.
    assert {"operator": "Exists"} in tolerations
    assert "nodeSelector" not in df.pod_spec(_agent()) and "affinity" not in df.pod_spec(_agent())


def test_agent_container_has_exactly_the_datapath_capabilities() -> None:
    ctx = df.container(_agent(), "agent")["securityContext"]
    assert ctx["privileged"] is False
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert sorted(ctx["capabilities"]["add"]) == sorted(AGENT_CAPS)


def test_agent_host_paths_are_only_bpffs_and_btf() -> None:
    spec = df.pod_spec(_agent())
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"/sys/fs/bpf", "/sys/kernel/btf"}
    mounts = {m["mountPath"]: m for m in df.container(_agent(), "agent")["volumeMounts"]}
    assert mounts["/sys/kernel/btf"]["readOnly"] is True
    # Kubernetes refuses Bidirectional propagation for unprivileged containers; the pins are files in the
    # host's bpffs mount and need none.
    assert mounts["/sys/fs/bpf"].get("mountPropagation") in {None, "None", "HostToContainer"}
    assert mounts["/lib/modules"]["readOnly"] is True  # the header links, written by the init container


def test_agent_env_node_name_comes_from_the_downward_api() -> None:
    env = {e["name"]: e for e in df.container(_agent(), "agent")["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_agent_probes_ask_its_health_endpoint() -> None:
    """Pins outlive a hung agent: the probes ask the agent itself (/healthz, /readyz on --health-endpoint)."""
    agent = df.container(_agent(), "agent")
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    [port] = [p for p in agent["ports"] if p["name"] == "health"]
    assert port["containerPort"] == split_host_port(DEFAULT_HEALTH_ENDPOINT, "health_endpoint")[1]
    assert "--health-endpoint" not in agent["args"]  # the default: the port named above


def test_enricher_is_non_root_with_no_capabilities() -> None:
    spec = df.pod_spec(_enricher())
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert not spec.get("hostNetwork")
    ctx = df.container(_enricher(), "enricher")["securityContext"]
    assert ctx["privileged"] is False
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}


def test_enricher_ports_and_probes() -> None:
    enricher = df.container(_enricher(), "enricher")
    ports = {p["name"]: p["containerPort"] for p in enricher["ports"]}
    assert ports == {"otlp-grpc": 4317, "otlp-http": 4318, "metrics": 9464}
    assert enricher["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert enricher["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert _enricher()["spec"]["replicas"] == 2


@pytest.mark.parametrize("workload", ["otel-kzt-agent", "otel-kzt-enricher"])
def test_every_container_has_requests_limits_and_seccomp(workload: str) -> None:
    obj = _agent() if workload == "otel-kzt-agent" else _enricher()
    assert df.pod_spec(obj)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in df.all_containers(obj):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]


def test_init_container_runs_as_non_root() -> None:
    init = df.container(_agent(), "link-kernel-headers")["securityContext"]
    assert init["runAsNonRoot"] is True and "add" not in init["capabilities"]


def _rules_of(role: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = df.get("ClusterRole", role)["rules"]
    return rules


def test_rbac_is_exactly_least_privilege() -> None:
    assert _rules_of("otel-kzt-agent") == [
        {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": READ_VERBS},
        {"apiGroups": [""], "resources": ["services"], "verbs": READ_VERBS},  # cgroup mode: Service VIPs
    ]
    assert _rules_of("otel-kzt-enricher") == [
        {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": READ_VERBS},
        {"apiGroups": [""], "resources": ["services"], "verbs": READ_VERBS},  # Service attribution, savings
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": READ_VERBS},
    ]
    assert not df.of_kind("Role") and not df.of_kind("RoleBinding")
    assert {r["metadata"]["name"] for r in df.of_kind("ClusterRole")} == {
        "otel-kzt-agent",
        "otel-kzt-enricher",
    }


def test_each_service_account_is_bound_to_its_own_role_only() -> None:
    bindings = df.of_kind("ClusterRoleBinding")
    assert len(bindings) == 2
    for binding in bindings:
        name = binding["metadata"]["name"]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "otel-kzt"}]
    for workload in _workloads():
        account = df.pod_spec(workload)["serviceAccountName"]
        assert account == workload["metadata"]["name"]
