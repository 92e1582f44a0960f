"""Building the kubernetes client's ApiClient from in-cluster config or a kubeconfig, errors translated."""

from __future__ import annotations

import os

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from otel_kzt.errors import MetadataError


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
                k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
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
