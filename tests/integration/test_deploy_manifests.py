"""deploy/ validates against the Kubernetes schemas of a current release and hangs together.

kubernetes-validate checks every built-in object (strict: unknown fields are errors). The Prometheus
Operator objects have no schema there: their metadata is checked against ObjectMeta and their spec
structurally. Cross-references (Service selectors, named ports, the kustomization's file list, the
ServiceMonitor's port) are what a schema cannot see, so they are checked here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from tests.integration import deploy_files as df

K8S_VERSION = kv_utils.latest_version()
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _builtin_objects() -> list[tuple[str, df.Obj]]:
    return [
        (f"{p.name}:{o['kind']}/{o['metadata']['name']}", o)
        for p in df.manifest_files()
        for o in df.objects(p)
        if o["kind"] not in CRD_KINDS
    ]


def test_current_kubernetes_release_is_used() -> None:
    major, minor = (int(x) for x in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33), f"kubernetes-validate only knows {K8S_VERSION}: upgrade it"


@pytest.mark.parametrize(("where", "obj"), _builtin_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_builtin_object_validates_strictly(where: str, obj: df.Obj) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_object() -> None:
    # The validator must be able to say no: a misspelt field in a copy of the DaemonSet is refused.
    broken = json.loads(json.dumps(df.get("DaemonSet", "otel-kzt-agent")))
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kv_utils.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_exactly_the_manifests() -> None:
    kustomization = yaml.safe_load(df.KUSTOMIZATION.read_text())
    listed = {df.DEPLOY / r for r in kustomization["resources"]}
    assert listed == set(df.manifest_files())
    assert kustomization["namespace"] == "otel-kzt"
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (df.DEPLOY / file).is_file(), file
    images = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"].split(":")[0]
        for w in df.of_kind("DaemonSet") + df.of_kind("Deployment")
        for c in df.all_containers(w)
    }
    assert used <= images, "every image can be retargeted from the kustomization"


def test_dashboard_configmap_the_generator_makes_is_valid() -> None:
    kustomization = yaml.safe_load(df.KUSTOMIZATION.read_text())
    (generator,) = kustomization["configMapGenerator"]
    data = {Path(f).name: (df.DEPLOY / f).read_text() for f in generator["files"]}
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": generator["name"],
            "namespace": "otel-kzt",
            "labels": generator["options"]["labels"],
        },
        "data": data,
    }
    kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
    # A ConfigMap holds at most 1 MiB; the sidecar loads it as one dashboard.
    assert sum(len(v.encode()) for v in data.values()) < 1024 * 1024


def test_every_object_is_in_the_namespace_or_cluster_scoped() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for obj in df.objects():
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"]["namespace"] == "otel-kzt", obj["metadata"]["name"]


def test_services_select_the_enricher_pods_and_name_real_ports() -> None:
    deployment = df.get("Deployment", "otel-kzt-enricher")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in df.container(deployment, "enricher")["ports"]}
    services = df.of_kind("Service")
    assert {s["metadata"]["name"] for s in services} == {"otel-kzt-enricher", "otel-kzt-enricher-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    headless = df.get("Service", "otel-kzt-enricher-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert {p["port"] for p in headless["spec"]["ports"]} == {4317, 4318}


def test_agent_points_at_the_headless_service() -> None:
    agent = df.container(df.get("DaemonSet", "otel-kzt-agent"), "agent")
    endpoint = agent["args"][agent["args"].index("--otlp-endpoint") + 1]
    match = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)", endpoint)
    assert match, endpoint
    assert match.groups() == ("otel-kzt-enricher-headless", "otel-kzt", "4317")


def test_pdb_keeps_a_replica_and_selects_the_enricher() -> None:
    pdb = df.get("PodDisruptionBudget", "otel-kzt-enricher")
    deployment = df.get("Deployment", "otel-kzt-enricher")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def _object_meta_schema() -> dict[str, object]:
    defs = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION
    )
    defs.pop("$id", None)
    return {**defs, "$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_operator_object_metadata_validates(kind: str) -> None:
    (obj,) = df.of_kind(kind)
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    jsonschema.validate(obj["metadata"], _object_meta_schema())
    with pytest.raises(jsonschema.ValidationError):  # the schema can say no
        jsonschema.validate({**obj["metadata"], "lables": {}}, _object_meta_schema())
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}


def test_servicemonitor_scrapes_each_replica_once_on_the_metrics_port() -> None:
    monitor = df.get("ServiceMonitor", "otel-kzt-enricher")
    selector = monitor["spec"]["selector"]
    selected = [
        s
        for s in df.of_kind("Service")
        if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
        and all(
            e["key"] not in s["metadata"]["labels"]
            for e in selector["matchExpressions"]
            if e["operator"] == "DoesNotExist"
        )
    ]
    assert [s["metadata"]["name"] for s in selected] == ["otel-kzt-enricher"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["otel-kzt"]}


def test_prometheusrule_is_rendered_from_the_one_rules_source(tmp_path: Path) -> None:
    from deploy.prometheus.render_prometheusrule import render

    committed = (df.DEPLOY / "prometheusrule.yaml").read_text()
    assert committed == render(), "run: python deploy/prometheus/render_prometheusrule.py"
    rule = yaml.safe_load(committed)
    assert rule["spec"]["groups"] == yaml.safe_load(df.RULES.read_text())["groups"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"].strip(), r


@pytest.mark.integration
def test_prometheusrule_spec_passes_promtool(tmp_path: Path) -> None:
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/setup.sh (Debian package prometheus)"
    spec = yaml.safe_load((df.DEPLOY / "prometheusrule.yaml").read_text())["spec"]
    extracted = tmp_path / "kx-operator-rules.yaml"
    extracted.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [promtool, "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_container_args_are_accepted_by_the_real_command_line() -> None:
    # The manifests' args go through the same parser and config validation as on a node.
    from otel_kzt.agent.command import load_config
    from otel_kzt.cli import build_parser
    from otel_kzt.enricher.command import build_config

    agent = df.container(df.get("DaemonSet", "otel-kzt-agent"), "agent")
    args = build_parser().parse_args(agent["args"])
    env = {e["name"]: "kx-node-1" for e in agent["env"] if e["name"] == "NODE_NAME"}
    config = load_config(args, environ=env)
    assert config.node_name == "kx-node-1"
    assert config.otlp.endpoints == ("http://otel-kzt-enricher-headless.otel-kzt.svc:4317",)
    assert config.pin is True  # the probes look for the pins

    enricher = df.container(df.get("Deployment", "otel-kzt-enricher"), "enricher")
    enricher_config = build_config(build_parser().parse_args(enricher["args"]))
    ports = {p["containerPort"] for p in enricher["ports"]}
    for endpoint in (
        enricher_config.grpc_endpoint,
        enricher_config.http_endpoint,
        enricher_config.metrics_endpoint,
    ):
        host, port = endpoint.rsplit(":", 1)
        assert int(port) in ports, endpoint
        assert not host.startswith("127.") and host not in {"localhost", "[::1]"}, "probes come from outside"
