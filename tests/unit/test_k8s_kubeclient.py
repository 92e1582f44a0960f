"""In-cluster configuration: the ServiceAccount token is re-read when kubelet rotates it.

Without the re-read the client library keeps the old token for up to a minute after a rotation, and a
bound token is refused as soon as it is replaced: every list and watch was 401 meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otel_kzt.errors import MetadataError
from otel_kzt.k8s import kubeclient


def _bearer(api_client: object) -> str:
    return str(api_client.configuration.auth_settings()["BearerToken"]["value"])  # type: ignore[attr-defined]


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "token").write_text("token-one")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(kubeclient, "TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setattr(kubeclient, "CA_FILE", str(tmp_path / "ca.crt"))
    monkeypatch.setattr(kubeclient, "TOKEN_CHECK_EVERY_S", 0.0)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return tmp_path


def test_in_cluster_client_sends_the_rotated_token(service_account: Path) -> None:
    api_client, where = kubeclient.load_api_client(None)
    assert where == "in-cluster"
    assert api_client.configuration.host == "https://10.96.0.1:443"
    assert _bearer(api_client) == "bearer token-one"
    new = service_account / "token.new"  # kubelet swaps the file atomically
    new.write_text("token-two\n")
    os.replace(new, service_account / "token")
    assert _bearer(api_client) == "bearer token-two"
    api_client.close()  # type: ignore[no-untyped-call]


def test_token_gone_later_keeps_the_last_one(service_account: Path) -> None:
    api_client, _ = kubeclient.load_api_client(None)
    (service_account / "token").unlink()
    assert _bearer(api_client) == "bearer token-one"
    api_client.close()  # type: ignore[no-untyped-call]


def test_empty_token_at_start_is_a_metadata_error(
    service_account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (service_account / "token").write_text("")
    monkeypatch.setenv("KUBECONFIG", str(service_account / "missing-kubeconfig"))
    with pytest.raises(MetadataError, match="Kubernetes configuration"):
        kubeclient.load_api_client(None)
