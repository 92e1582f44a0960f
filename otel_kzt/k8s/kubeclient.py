"""Building the kubernetes client's ApiClient from in-cluster config or a kubeconfig, errors translated.

In-cluster, the ServiceAccount token is a bound token that kubelet rotates (hourly by default, the old one
refused once it expires or its pod binding goes). The client library re-reads the token file only once a
minute, so after a rotation every request was 401 for up to 60 s; `_watch_token` re-reads it whenever the
file changes (its stat signature, checked at most once per `TOKEN_CHECK_EVERY_S`, see filewatch.py).
"""

from __future__ import annotations

import os

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config import incluster_config
from kubernetes.config.config_exception import ConfigException

from otel_kzt.errors import ConfigError, MetadataError
from otel_kzt.filewatch import CHECK_EVERY_S, WatchedFiles, token_text

# Module attributes, not constants inlined: tests point them at a temporary ServiceAccount directory.
TOKEN_FILE = incluster_config.SERVICE_TOKEN_FILENAME
CA_FILE = incluster_config.SERVICE_CERT_FILENAME
TOKEN_CHECK_EVERY_S = CHECK_EVERY_S


def _watch_token(configuration: k8s_client.Configuration, token_file: str) -> None:
    """Replace the library's once-a-minute token refresh by a re-read on every change of the file."""
    try:
        token = WatchedFiles(
            [token_file], token_text, "serviceaccount token", check_every_s=TOKEN_CHECK_EVERY_S
        )
    except ConfigError as exc:
        raise ConfigException(str(exc)) from exc

    def refresh(config: k8s_client.Configuration) -> None:
        config.api_key["BearerToken"] = "bearer " + token.current()

    configuration.refresh_api_key_hook = refresh  # type: ignore[assignment]
    refresh(configuration)


def _load_in_cluster(configuration: k8s_client.Configuration) -> None:
    incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=TOKEN_FILE, cert_filename=CA_FILE
    ).load_and_set(configuration)
    _watch_token(configuration, TOKEN_FILE)


def load_api_client(kubeconfig: str | None) -> tuple[k8s_client.ApiClient, str]:
    """An ApiClient from an explicit kubeconfig, else in-cluster, else $KUBECONFIG / ~/.kube/config."""
    configuration = k8s_client.Configuration()
    try:
        if kubeconfig:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
            where = kubeconfig
        else:
            try:
                _load_in_cluster(configuration)
                where = "in-cluster"
            except ConfigException:
                k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
                where = os.environ.get("KUBECONFIG") or "~/.kube/config"
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        raise MetadataError(
            f"no usable Kubernetes configuration (in-cluster, kubeconfig {kubeconfig or '$KUBECONFIG'}):"
            f" {exc} (use --kube-metadata FILE to run without an API server)"
        ) from exc
    return k8s_client.ApiClient(configuration), where
