"""deploy/ is secure by default on the wire: a bearer token from a Secret the kustomization makes (from a
file that never enters git), a NetworkPolicy in front of the enricher, and TLS with cert-manager as an
overlay (deploy/tls/) whose patches apply to the base and whose result the real command line accepts.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

from tests.integration import deploy_files as df

TLS = df.DEPLOY / "tls"
K8S_VERSION = kv_utils.latest_version()


def _arg(container: df.Obj, flag: str) -> str:
    args = container["args"]
    return str(args[args.index(flag) + 1])


def _mounted_secret(workload: df.Obj, container: df.Obj, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in `container`, through its volume mounts."""
    volumes = {v["name"]: v for v in df.pod_spec(workload)["volumes"]}
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/"):
            assert mount.get("readOnly") is True, mount
            secret = volumes[mount["name"]]["secret"]
            name = path[len(mount["mountPath"]) + 1 :]
            (item,) = [i for i in secret["items"] if i["path"] == name]
            return secret["secretName"], item["key"]
    raise AssertionError(f"{path} is not on a mounted Secret")


def test_agents_and_enricher_share_a_generated_token_that_git_never_sees() -> None:
    kustomization = yaml.safe_load(df.KUSTOMIZATION.read_text())
    (generator,) = kustomization["secretGenerator"]
    assert generator["options"]["disableNameSuffixHash"] is True  # rotations reach running pods
    key, file = generator["files"][0].split("=")
    ignored = subprocess.run(["git", "check-ignore", "-q", file], cwd=df.DEPLOY, check=False, timeout=30)
    assert ignored.returncode == 0, f"deploy/{file} must be git-ignored"
    agent_ds, enricher_deploy = (
        df.get("DaemonSet", "otel-kzt-agent"),
        df.get("Deployment", "otel-kzt-enricher"),
    )
    agent, enricher = df.container(agent_ds, "agent"), df.container(enricher_deploy, "enricher")
    sent = _mounted_secret(agent_ds, agent, _arg(agent, "--otlp-bearer-token-file"))
    required = _mounted_secret(enricher_deploy, enricher, _arg(enricher, "--bearer-token-file"))
    assert sent == required == (generator["name"], key)


def test_networkpolicy_admits_otlp_from_nodes_and_clients_and_metrics_from_scrapers() -> None:
    policy = df.get("NetworkPolicy", "otel-kzt-enricher")
    enricher = df.get("Deployment", "otel-kzt-enricher")
    labels = enricher["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"] for p in df.container(enricher, "enricher")["ports"]}
    admitted: dict[str, list[df.Obj]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in ports, port
            admitted.setdefault(port["port"], []).extend(rule["from"])
    assert set(admitted) == ports  # every port has a rule, and only the pod's ports
    for port in ("otlp-grpc", "otlp-http"):
        sources = admitted[port]
        assert any("ipBlock" in s for s in sources), "host-network agents come from node addresses"
        assert not any("podSelector" in s and "namespaceSelector" not in s for s in sources)
        assert all(s.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0") for s in sources)


def _patch(obj: df.Obj, ops: list[dict[str, Any]]) -> df.Obj:
    """RFC 6902 add / replace / test, as kustomize applies them."""
    out = copy.deepcopy(obj)
    for op in ops:
        *parents, last = op["path"].lstrip("/").split("/")
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "test":
            assert node[int(last)] == op["value"], op
        elif op["op"] == "add" and last == "-":
            node.append(op["value"])
        elif op["op"] in ("add", "replace"):
            node[int(last) if isinstance(node, list) else last] = op["value"]
        else:
            raise AssertionError(f"unexpected op {op}")
    return out


def test_tls_overlay_patches_the_base_into_what_the_command_line_accepts(tmp_path: Path) -> None:
    from otel_kzt.agent.command import load_config
    from otel_kzt.cli import build_parser
    from otel_kzt.enricher.command import build_config

    overlay = yaml.safe_load((TLS / "kustomization.yaml").read_text())
    assert overlay["resources"][0] == "../"
    patched = {}
    for patch in overlay["patches"]:
        base = df.get(patch["target"]["kind"], patch["target"]["name"])
        patched[patch["target"]["kind"]] = _patch(base, yaml.safe_load((TLS / patch["path"]).read_text()))
    for workload in patched.values():
        kubernetes_validate.validate(workload, K8S_VERSION, strict=True)
    enricher = df.container(patched["Deployment"], "enricher")
    config = build_config(build_parser().parse_args(enricher["args"]))
    assert config.tls_cert_file and config.tls_key_file
    agent = df.container(patched["DaemonSet"], "agent")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args = [str(ca) if a == _arg(agent, "--otlp-certificate") else a for a in agent["args"]]
    agent_config = load_config(build_parser().parse_args(args), environ={"NODE_NAME": "kx-node-1"})
    (endpoint,) = agent_config.otlp.endpoints
    assert endpoint.startswith("https://") and agent_config.otlp.certificate == str(ca)

    certificates = list(yaml.safe_load_all((TLS / "certificates.yaml").read_text()))
    by_name = {(c["kind"], c["metadata"]["name"]): c for c in certificates}
    assert all(c["apiVersion"] == "cert-manager.io/v1" for c in certificates)
    serving = next(c for c in certificates if c["kind"] == "Certificate" and not c["spec"].get("isCA"))
    host = endpoint.split("//", 1)[1].rsplit(":", 1)[0]
    assert host in serving["spec"]["dnsNames"], "agents verify the certificate against this name"
    assert serving["spec"]["privateKey"]["rotationPolicy"] == "Always"
    issuer = by_name["Issuer", serving["spec"]["issuerRef"]["name"]]
    assert by_name["Certificate", issuer["spec"]["ca"]["secretName"]]["spec"]["isCA"] is True
    secret = serving["spec"]["secretName"]
    assert _mounted_secret(patched["Deployment"], enricher, config.tls_cert_file) == (secret, "tls.crt")
    assert _mounted_secret(patched["Deployment"], enricher, config.tls_key_file) == (secret, "tls.key")
    assert _mounted_secret(patched["DaemonSet"], agent, _arg(agent, "--otlp-certificate")) == (
        secret,
        "ca.crt",
    )
