"""The components in a pod: HTTPS to the API server verified through the ServiceAccount's ca.crt, the token
from the volume, and the token rotated under a running enricher (kubelet replaces bound tokens).

Without the token re-read (otel_kzt/k8s/kubeclient.py) the enricher sent the old token for up to a minute
after a rotation: every reconnect was 401 and its metadata stopped following the cluster.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tests.integration.deploy_stack import EnricherProcess, http_get, wait_for
from tests.support.incluster import SA_DIR, InCluster
from tests.support.k8s_apiserver import ENRICHER, FakeApiServer
from tests.support.k8s_objects import make_node, make_pod
from tests.support.tls import Issuer


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer(tls_dir=tmp_path / "pki") as server:
        server.add(make_node("node-a", ["10.0.0.1"]))
        server.add(make_pod("web-1", "node-a", ["10.1.0.5"]))
        yield server


def test_clients_verify_the_server_through_the_ca(api: FakeApiServer, tmp_path: Path) -> None:
    assert api.url.startswith("https://")
    with api.client(tmp_path / "kubeconfig", ENRICHER) as client:
        assert len(k8s_client.CoreV1Api(client).list_node().items) == 1
    other = Issuer(tmp_path / "other-ca")  # a server certificate from another CA is refused
    path = Path(api.write_kubeconfig(tmp_path / "kubeconfig-other", ENRICHER))
    config = yaml.safe_load(path.read_text())
    config["clusters"][0]["cluster"]["certificate-authority"] = str(other.cert)
    path.write_text(yaml.safe_dump(config))
    configuration = k8s_client.Configuration()
    k8s_config.load_kube_config(config_file=str(path), client_configuration=configuration)  # type: ignore[no-untyped-call]
    with k8s_client.ApiClient(configuration) as client:
        with pytest.raises(urllib3.exceptions.MaxRetryError) as raised:
            k8s_client.CoreV1Api(client).list_node(_request_timeout=5)
        assert isinstance(raised.value.reason, urllib3.exceptions.SSLError)
        assert "CERTIFICATE_VERIFY_FAILED" in str(raised.value.reason)
    wait_for(lambda: "TLSV1_ALERT_UNKNOWN_CA" in api.tls_failures, 10, "the server told of the refusal")


def test_the_pod_sees_its_volume_and_the_host_does_not(api: FakeApiServer, tmp_path: Path) -> None:
    pod = InCluster(tmp_path, api, ENRICHER)
    script = f"cat {SA_DIR}/namespace; echo; cat {SA_DIR}/token; echo; echo $KUBERNETES_SERVICE_PORT $HOME"
    out = subprocess.run(
        [*pod.wrapper(), "sh", "-c", script], check=False, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["otel-kzt", api.token(ENRICHER), f"{api.port} {pod.home}"]
    assert not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()


def _watched_since(api: FakeApiServer, start: int) -> set[str]:
    return {r.split()[1] for r in api.requests[start:] if r.startswith("watch ")}


def test_enricher_in_cluster_keeps_syncing_across_a_token_rotation(
    api: FakeApiServer, tmp_path: Path
) -> None:
    pod = InCluster(tmp_path, api, ENRICHER)
    enricher = EnricherProcess(tmp_path, [], "enricher", wrapper=pod.wrapper())  # no kubeconfig: in-cluster
    try:
        enricher.wait_ready()
        wait_for(lambda: {"pods", "nodes"} <= _watched_since(api, 0), 20, "the enricher's first watches")
        watched = _watched_since(api, 0)
        assert api.refusals == []
        old = api.token(ENRICHER)
        assert pod.rotate() != old
        start = len(api.requests)
        api.drop_connections()  # every watch reconnects, now with whatever token the enricher sends
        api.add(make_pod("web-2", "node-a", ["10.1.0.6"]))
        # Refused at once (the worst case), the old token may be sent until the next look at the file (1 s);
        # the library's own refresh kept it for a minute, longer than this wait.
        wait_for(lambda: watched <= _watched_since(api, start), 20, f"{watched} watched again after rotation")
        assert all(r.startswith("401 ") for r in api.refusals), api.refusals
        refused = len(api.refusals)
        wait_for(lambda: http_get(f"http://{enricher.metrics_target}/readyz")[0] == 200, 20, "ready again")
        assert len(api.refusals) == refused, f"refused after resuming:\n{enricher.tail()}"
    finally:
        enricher.stop()
